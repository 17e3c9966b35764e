"""edgevl verify: check a bundle's files, containment and signature against trusted public keys."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--trust", nargs="+", metavar="PUBKEY",
                   help="trusted public key files or folders (default: the EDGEVL_TRUST policy)")


def run(args) -> int:
    from edgevl.bundle import load_bundle
    from edgevl.errors import ConfigError
    from edgevl.signing import policy_from

    if policy_from(args.trust) is None:
        raise ConfigError("no trusted keys: pass --trust PUBKEY... or set EDGEVL_TRUST on this device")
    bundle = load_bundle(args.bundle, trust=args.trust)
    print(f"OK {bundle.path}: {len(bundle.manifest['files'])} files sha256 verified, every path inside the bundle, "
          f"signed by {bundle.signer.describe()}")
    return 0
