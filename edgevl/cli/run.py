"""edgevl run: answer one prompt about one image with a bundle."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--backend", default=None, help="onnxruntime, openvino or tensorrt (default: best installed)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--json", action="store_true", help='print {"text": ..., "timings_ms": {...}}')


def run(args) -> int:
    import edgevl

    vlm = edgevl.load(args.bundle, backend=args.backend, threads=args.threads, verbose=not args.json)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.stream and not args.json:
        for piece in vlm.stream(args.image, args.prompt, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    result = vlm.generate(args.image, args.prompt, **sampling)
    if args.json:
        print(json.dumps({"text": result.text, "timings_ms": result.timings_ms, "tokens": result.tokens,
                          "backend": vlm.backend}))
    else:
        print(result.text)
    return 0
