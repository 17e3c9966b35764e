"""edgevl qat: quantization-aware fine-tuning (NNCF) of edgevl-tiny -> a Q/DQ INT8 bundle."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="edgevl-tiny", help="edgevl-tiny or an edgevl-tiny checkpoint directory")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    p.add_argument("--batch-scenes", type=int, default=8, help="images per step, five questions each (default 8)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of weights and quantizer scales")
    p.add_argument("--calib-samples", type=int, default=32, help="images for the initial range calibration")
    p.add_argument("--eval-scenes", type=int, default=200, help="validation scenes in the accuracy report")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from edgevl.exporters.quantize.qat import qat_bundle
    from edgevl.exporters.quantize.recipes import QATRecipe

    recipe = QATRecipe(steps=args.steps, batch_scenes=args.batch_scenes, lr=args.lr, calib_samples=args.calib_samples,
                       eval_scenes=args.eval_scenes, threads=args.threads, seed=args.seed)
    qat_bundle(args.model, args.out, recipe, force=args.force)
    return 0
