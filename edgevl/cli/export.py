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
    p.add_argument("--image-size", type=image_size, default=None, metavar="WxH",
                   help="the one image size the bundle encodes, for families whose processor resizes per image "
                        "(Qwen2-VL/Qwen2.5-VL; default from the processor's min/max pixels)")


def image_size(text: str) -> tuple[int, int]:
    """'448x336' -> (448, 336): width x height."""
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 448x448")
    return int(w), int(h)


def run(args) -> int:
    from edgevl.exporters.export import export_model

    export_model(args.model, args.out, force=args.force, atol=args.atol, check_tokens=not args.no_token_check,
                 image_size=args.image_size)
    return 0
