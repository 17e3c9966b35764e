"""edgevl info: print a bundle's manifest readably (after verifying every file's sha256), and who signed it."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.add_argument("--trust", nargs="+", metavar="PUBKEY",
                   help="check the signature against these public keys (default: the EDGEVL_TRUST policy)")


def run(args) -> int:
    from edgevl.bundle import describe, load_bundle

    bundle = load_bundle(args.bundle, trust=getattr(args, "trust", None))
    print(json.dumps(bundle.manifest, indent=2) if args.json else describe(bundle))
    return 0
