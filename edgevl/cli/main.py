"""The `edgevl` command. Each subcommand lives in its own module with ``add_parser`` and ``run``;
a subcommand is listed here only once it works."""

from __future__ import annotations

import argparse
import importlib
import sys

from edgevl import __version__
from edgevl.errors import EdgeVLError

COMMANDS = {
    # name: (module, one-line help)
    "train": ("edgevl.cli.train", "train the embedded edgevl-tiny model on the synthetic world"),
    "eval": ("edgevl.cli.eval", "exact-match accuracy on held-out scenes (PyTorch model or a bundle)"),
    "export": ("edgevl.cli.export", "export a model to a validated FP32 ONNX bundle"),
    "quantize": ("edgevl.cli.quantize", "INT8 post-training quantization of a bundle to Q/DQ ONNX, within an accuracy budget"),
    "qat": ("edgevl.cli.qat", "quantization-aware fine-tuning of edgevl-tiny (NNCF) to a Q/DQ INT8 bundle"),
    "build": ("edgevl.cli.build", "export, quantize and compile for a target in one command"),
    "compile": ("edgevl.cli.compile", "compile a bundle for a target (TensorRT engines) on this device"),
    "info": ("edgevl.cli.info", "print a bundle's manifest readably"),
    "compare": ("edgevl.cli.compare", "compare a bundle's parts across backends"),
    "run": ("edgevl.cli.run", "answer a prompt about an image with a bundle"),
    "bench": ("edgevl.cli.bench", "benchmark backends and precisions side by side against PyTorch eager"),
    "stream": ("edgevl.cli.stream", "answer a prompt live about camera, video, RTSP/GStreamer or folder frames"),
    # trust: signed bundles and safe installs on devices (edgevl.signing, edgevl.install)
    "keygen": ("edgevl.cli.keygen", "make an Ed25519 key pair for signing bundles"),
    "sign": ("edgevl.cli.sign", "sign a bundle's manifest with a private key"),
    "verify": ("edgevl.cli.verify", "verify a bundle's files, containment and signature against trusted keys"),
    "install": ("edgevl.cli.install", "install a bundle into a models directory atomically (verify, smoke test, switch)"),
    "rollback": ("edgevl.cli.rollback", "make the previous installed version of a model active again"),
    "serve": ("edgevl.cli.serve", "serve bundles over an OpenAI-compatible HTTP API (locally, or on Ray Serve)"),
    "batch": ("edgevl.cli.batch", "answer a prompt about every image or video frame to JSONL (locally, or on Ray Data)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgevl", description="Edge deployment compiler and runtime for VLMs.")
    parser.add_argument("--version", action="version", version=f"edgevl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return importlib.import_module(args._module).run(args) or 0
    except EdgeVLError as e:
        print(f"edgevl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgevl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
