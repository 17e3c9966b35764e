"""edgevl compare: run a bundle's parts on several backends with the same inputs and report
per-output max abs diff and cosine against the first backend."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--backends", default=None, help="comma-separated (default: every installed backend)")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--json", dest="json_path", default=None, help="write the report as JSON here")


def run(args) -> int:
    from edgevl.bundle import load_bundle
    from edgevl.runtimes.crosscheck import compare_backends
    from edgevl.runtimes.registry import installed_backends

    bundle = load_bundle(args.bundle)
    backends = args.backends.split(",") if args.backends else [b for b in installed_backends() if b != "tensorrt"]
    reports = compare_backends(bundle, backends, atol=args.atol)
    for r in reports:
        print(r.summary())
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump([r.to_dict() for r in reports], f, indent=2)
    return 0 if all(r.passed for r in reports) else 1
