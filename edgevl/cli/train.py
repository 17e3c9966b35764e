"""edgevl train: train edgevl-tiny within a time budget (default 28 min on 2 CPU cores)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="checkpoint directory (default: the embedded default inside the package)")
    p.add_argument("--minutes", type=float, default=28.0, help="wall-clock training budget (default 28)")
    p.add_argument("--batch-scenes", type=int, default=16, help="scenes per step; each carries all five questions")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-scenes", type=int, default=40, help="validation scenes per periodic check")


def run(args) -> int:
    from edgevl.models.checkpoint import EMBEDDED_DIR
    from edgevl.train import TrainRecipe, train

    recipe = TrainRecipe(minutes=args.minutes, batch_scenes=args.batch_scenes, seed=args.seed, threads=args.threads,
                         eval_scenes=args.eval_scenes)
    if args.lr is not None:
        recipe.lr = args.lr
    out = args.out or EMBEDDED_DIR
    log = train(out, recipe)
    last = log["evals"][-1] if log["evals"] else {}
    print(json.dumps({"out": str(out), "steps": log["total_steps"], "train_seconds": log["train_seconds"],
                      "last_val_accuracy": last.get("accuracy")}))
    print(f"loss curve: {out}/loss.png")
    return 0
