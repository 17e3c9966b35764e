"""edgevl eval: exact-match accuracy on held-out scenes, for the PyTorch model or a bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", nargs="?", help="bundle directory (omit to evaluate the PyTorch model)")
    p.add_argument("--model", default="edgevl-tiny", help="PyTorch model when no bundle is given (default edgevl-tiny)")
    p.add_argument("--backend", default=None, help="backend for a bundle (default: best installed)")
    p.add_argument("--n", type=int, default=200, help="number of held-out scenes (each asks all five tasks)")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_path", default=None, help="write the result as JSON here")
    p.add_argument("--answers", action="store_true", help="include every answer in the JSON")
    p.add_argument("--check-report", action="store_true",
                   help="re-run a quantized bundle's accuracy report (its scenes, split, backends) and compare")


def run(args) -> int:
    from edgevl.evaluate import evaluate

    if args.check_report:
        from edgevl.exporters.quantize.report import check_report

        return check_report(args.bundle, backend=args.backend, threads=args.threads)
    if args.bundle:
        import edgevl

        vlm = edgevl.load(args.bundle, backend=args.backend, threads=args.threads)
        answerer = vlm.answer
        what = {"bundle": str(args.bundle), "backend": vlm.backend, "precision": vlm.bundle.precision}
    else:
        import torch

        from edgevl.models.checkpoint import load_checkpoint
        from edgevl.models.reference import TorchAnswerer

        if args.threads:
            torch.set_num_threads(args.threads)
        model, tokenizer = load_checkpoint(args.model)
        answerer = TorchAnswerer(model, tokenizer)
        what = {"model": args.model, "backend": "pytorch", "precision": "fp32"}
    result = evaluate(answerer, n=args.n, split=args.split, progress=True, keep_answers=args.answers)
    result.update(what)
    text = json.dumps(result, indent=2)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(text + "\n")
    summary = {k: v for k, v in result.items() if k != "answers"}
    print(json.dumps(summary, indent=2))
    return 0
