"""edgevl compile: add a target's compiled artefacts (TensorRT engines, ...) to a bundle.

    edgevl compile BUNDLE --target tensorrt [--out DIR] [--fp16 | --int8] [--max-batch 8 ...]

Without --out the bundle is replaced atomically; the ONNX parts stay, so other backends still
run it. Each target adds its own flags (see `edgevl compile --help`).
"""

from __future__ import annotations

import argparse
import importlib


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgevl.exporters.compile import TARGETS

    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--target", required=True, choices=sorted(TARGETS), help="what to compile for")
    p.add_argument("--out", default=None, help="write a new bundle here (default: replace BUNDLE)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--precision", choices=("auto", "fp32", "fp16", "int8"), default="auto",
                      help="auto (default): INT8 for parts with Q/DQ nodes, FP16 for the rest")
    for name in ("fp32", "fp16", "int8"):
        prec.add_argument(f"--{name}", dest="precision", action="store_const", const=name,
                          help=f"same as --precision {name}")
    p.add_argument("--parts", default=None, help="comma-separated parts to compile (default: all)")
    for target, module in TARGETS.items():
        importlib.import_module(module).add_arguments(p.add_argument_group(f"{target} options"))


def run(args) -> int:
    from edgevl.exporters.compile import compile_bundle, target_module

    options = target_module(args.target).options_from_args(args)
    options["precision"] = args.precision
    options["parts"] = [p for p in args.parts.split(",") if p] if args.parts else None
    compile_bundle(args.bundle, args.target, out=args.out, force=args.force, **options)
    return 0
