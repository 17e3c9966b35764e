"""edgevl install: copy a bundle into a models directory, verify and smoke-test it, then make it
the active version atomically (the previous one is kept for `edgevl rollback`)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory to install")
    p.add_argument("--into", required=True, help="models directory on this device (e.g. /var/lib/edgevl/models)")
    p.add_argument("--name", help="model name (default: the manifest's model name); load DIR/NAME/current")
    p.add_argument("--trust", nargs="+", metavar="PUBKEY",
                   help="trusted public key files or folders (default: the EDGEVL_TRUST policy)")
    p.add_argument("--backend", help="backend for the smoke generation (default: the best one installed here)")
    p.add_argument("--no-smoke", action="store_true", help="skip the smoke generation (not recommended)")


def run(args) -> int:
    from edgevl.install import install

    done = install(args.bundle, args.into, name=args.name, trust=args.trust, backend=args.backend,
                   smoke=not args.no_smoke, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"{done.name}: version {done.version} active at {done.path}"
          + (f", previous {done.previous} kept for rollback" if done.previous else ""))
    return 0
