"""edgevl quantize: an FP32 bundle -> an INT8 Q/DQ bundle with an accuracy report."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="FP32 bundle directory (from `edgevl export`)")
    p.add_argument("--calib", default=None,
                   help="calibration data: a folder of images, a video file, a .npy of images, or 'world[:split[:seed]]' "
                        "(required for INT8; not used by --weight-only)")
    p.add_argument("--weight-only", choices=["int8", "int4"], default=None,
                   help="decoder weight-only instead of INT8 Q/DQ (MatMulNBits for ONNX Runtime, NNCF IR for OpenVINO)")
    p.add_argument("--block-size", type=int, default=None,
                   help="weight-only block size (default 32: the bundle gets an ONNX Runtime and an OpenVINO "
                        "artefact, and NNCF's groups must divide every input width; 128 is faster on ONNX Runtime)")
    p.add_argument("--activations", choices=["int8", "uint8"], default=None,
                   help="int8: symmetric (TensorRT, ARM; portable); uint8: asymmetric (ONNX Runtime on x86); "
                        "default int8")

    p.add_argument("--method", default="percentile", choices=["minmax", "entropy", "percentile"],
                   help="activation range calibration (default percentile, 99.999th)")
    p.add_argument("--samples", type=int, default=64, help="calibration images (default 64)")
    p.add_argument("--decoder-prompts", type=int, default=32, help="prompts run to collect decoder feeds (default 32)")
    p.add_argument("--parts", default="vision,decoder", help="parts to quantize (default vision,decoder; embed stays float)")
    p.add_argument("--out", required=True, help="quantized bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--budget", type=float, default=1.0, help="accuracy loss allowed vs FP32, in points (default 1.0)")
    p.add_argument("--accept-loss", action="store_true", help="write the bundle even if it breaks the budget")
    p.add_argument("--eval-scenes", type=int, default=200, help="validation scenes for the budget (default 200)")
    p.add_argument("--no-sensitivity", action="store_true", help="do not move sensitive nodes to float")
    p.add_argument("--lm-head", default="auto", choices=["auto", "float", "int8"], help="LM head rule (default auto)")
    p.add_argument("--full-range-weights", action="store_true",
                   help="8-bit weight range (only for VNNI/ARM/GPU targets; default is 7-bit, exact on every x86)")
    p.add_argument("--threads", type=int, default=None)


def recipe_from_args(args):
    from edgevl.exporters.quantize.recipes import FloatRule, PTQRecipe

    return PTQRecipe(method=args.method, samples=args.samples, decoder_prompts=args.decoder_prompts,
                     parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()),
                     reduce_range=not args.full_range_weights, float_rule=FloatRule(lm_head=args.lm_head),
                     activations=args.activations or "int8",
                     budget_points=args.budget, accept_loss=args.accept_loss, eval_scenes=args.eval_scenes,
                     sensitivity=not args.no_sensitivity)


def run(args) -> int:
    from edgevl.errors import ConfigError
    from edgevl.exporters.quantize.ptq import quantize_bundle

    if args.weight_only:
        from edgevl.exporters.quantize.recipes import WeightOnlyRecipe, default_block_size
        from edgevl.exporters.quantize.weight_only import weight_only_bundle

        recipe = WeightOnlyRecipe(bits=8 if args.weight_only == "int8" else 4,
                                  block_size=args.block_size or default_block_size(WeightOnlyRecipe.backends))
        weight_only_bundle(args.bundle, args.out, recipe, force=args.force, budget_points=args.budget,
                           accept_loss=args.accept_loss, eval_scenes=args.eval_scenes, threads=args.threads)
        return 0
    if args.calib is None:
        raise ConfigError("INT8 quantization needs calibration data: pass --calib (a folder of images, a video, "
                          "or 'world' for the synthetic scenes)")
    quantize_bundle(args.bundle, args.calib, args.out, recipe_from_args(args), force=args.force, threads=args.threads)
    return 0
