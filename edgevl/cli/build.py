"""edgevl build: export -> quantize -> compile for one target, in one command, with progress bars."""

from __future__ import annotations

import argparse

from edgevl.cli.export import image_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="'edgevl-tiny', a local checkpoint directory or a Hugging Face Hub id (org/name)")
    p.add_argument("--target", required=True, choices=["onnxruntime", "openvino", "tensorrt"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4", "int8-qdq", "int8-wo", "int4-wo"],
                   help="int8 / int4: the fastest deployment, each part's recipe chosen by timing its candidates on "
                        "this machine (INT8 vision, INT8 or INT4 weight-only decoder; TensorRT: int8 = Q/DQ engines); "
                        "int8-qdq: static Q/DQ everywhere; *-wo: decoder weight-only; fp16: OpenVINO IR / TensorRT only")
    p.add_argument("--calib", default=None, help="calibration data for int8 / int8-qdq (folder, video, .npy, 'world'; default world)")
    p.add_argument("--method", default="percentile", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--samples", type=int, default=64, help="calibration images (default 64)")
    p.add_argument("--block-size", type=int, default=None,
                   help="weight-only block size (default 128 for --target onnxruntime, 32 for openvino, whose "
                        "NNCF groups must divide every input width)")
    p.add_argument("--activations", choices=["int8", "uint8"], default=None,
                   help="int8: symmetric (TensorRT, ARM; portable); uint8: asymmetric (ONNX Runtime on x86); "
                        "default: uint8 for --target onnxruntime, else int8")
    p.add_argument("--kv-cache", choices=["auto", "int8", "float32"], default="auto",
                   help="int8 / int4 on onnxruntime: the lowered decoder's KV cache; auto (default) keeps it in int8 "
                        "(calibrated per channel) when that is measured faster at a long cache and keeps the "
                        "accuracy gate")
    p.add_argument("--budget", type=float, default=1.0, help="accuracy loss allowed vs FP32, in points (default 1.0)")
    p.add_argument("--accept-loss", action="store_true", help="write the bundle even if it breaks the budget")
    p.add_argument("--eval-scenes", type=int, default=200, help="validation scenes for the budget (default 200)")
    p.add_argument("--image-size", type=image_size, default=None, metavar="WxH",
                   help="the one image size the bundle encodes (Qwen2-VL/Qwen2.5-VL; see edgevl export --help)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--threads", type=int, default=None)
    from edgevl.exporters.compile import target_module

    # --target tensorrt: the same engine options as `edgevl compile` (profiles, DLA, --via torch2trt)
    target_module("tensorrt").add_arguments(p.add_argument_group("tensorrt options (--target tensorrt)"))


def run(args) -> int:
    from edgevl.exporters.build import build_bundle
    from edgevl.exporters.compile import target_module

    compile_options = target_module("tensorrt").options_from_args(args) if args.target == "tensorrt" else None
    build_bundle(args.model, args.target, args.precision, args.out, calib=args.calib, force=args.force,
                 method=args.method, samples=args.samples, budget=args.budget, accept_loss=args.accept_loss,
                 eval_scenes=args.eval_scenes, block_size=args.block_size, activations=args.activations,
                 threads=args.threads, compile_options=compile_options, kv_cache=args.kv_cache,
                 image_size=args.image_size)
    return 0
