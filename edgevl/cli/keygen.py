"""edgevl keygen: make an Ed25519 key pair for signing bundles (private key owner-only)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="private key file to write (keep it on the build machine); "
                                                "the public key goes beside it with the suffix .pub")
    p.add_argument("--pub", help="public key file (default: OUT with the suffix .pub)")
    p.add_argument("--force", action="store_true", help="replace existing key files")


def run(args) -> int:
    from edgevl.signing import keygen

    private, public, kid = keygen(args.out, args.pub, force=args.force)
    print(f"key {kid}\n  private {private} (owner-only; sign with `edgevl sign BUNDLE --key {private}`)\n"
          f"  public  {public} (copy to devices; trust it with --trust {public} or EDGEVL_TRUST)")
    return 0
