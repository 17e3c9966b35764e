"""edgevl export: a model (edgevl-tiny or a local checkpoint directory) -> validated FP32 bundle."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="'edgevl-tiny', a local checkpoint directory (save_pretrained layout) or a Hugging Face "
                        "Hub id (org/name[@revision], from the HF cache offline)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs diff allowed between ONNX and PyTorch")
    p.add_argument("--no-token-check", action="store_true", help="skip the greedy-token identity check")


def run(args) -> int:
    from edgevl.exporters.export import export_model

    export_model(args.model, args.out, force=args.force, atol=args.atol, check_tokens=not args.no_token_check)
    return 0
