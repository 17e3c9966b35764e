"""edgevl sign: add a detached Ed25519 signature over a bundle's manifest (manifest.json.sig)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory (its files are verified before signing)")
    p.add_argument("--key", required=True, help="private key file from `edgevl keygen`")
    p.add_argument("--signer", default="", help="a name recorded with the signature (default: the key file's name)")


def run(args) -> int:
    from edgevl.signing import sign_bundle

    signer = sign_bundle(args.bundle, args.key, signer=args.signer)
    print(f"signed {args.bundle} with key {signer.key_id} ({signer.signer})")
    return 0
