"""edgevl rollback: make the previous installed version of a model active again."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--into", required=True, help="models directory given to `edgevl install`")
    p.add_argument("--name", required=True, help="model name")
    p.add_argument("--trust", nargs="+", metavar="PUBKEY",
                   help="trusted public key files or folders (default: the EDGEVL_TRUST policy)")


def run(args) -> int:
    from edgevl.install import rollback

    done = rollback(args.into, args.name, trust=args.trust, log=lambda msg: print(msg, file=sys.stderr))
    print(f"{done.name}: version {done.version} active at {done.path}, previous {done.previous}")
    return 0
