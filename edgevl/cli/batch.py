"""edgevl batch: one prompt about every image (or sampled video frame) to JSONL, resumable.

Locally with the batching engine, or with ``--ray`` on a Ray Data actor pool (``edgevl[ray]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--input", required=True, metavar="DIR|VIDEO|GLOB",
                   help="a folder of images/videos, one video or image file, or a glob such as 'shots/**/*.jpg'")
    p.add_argument("--prompt", required=True, help="the question asked about every image")
    p.add_argument("--out", required=True, help="JSONL file of answers; rerunning skips the ids already in it")
    p.add_argument("--every", type=int, default=30, metavar="N", help="videos: answer every Nth frame (default 30)")
    p.add_argument("--backend", default=None, help="onnxruntime, openvino or tensorrt (default: best installed)")
    p.add_argument("--threads", type=int, default=None, help="threads per model part")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=8, help="local: sequences decoded together (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("Ray Data (pip install edgevl[ray])")
    ray.add_argument("--ray", action="store_true", help="answer on a Ray cluster with an actor pool of engines")
    ray.add_argument("--ray-address", default=None,
                     help="cluster to join (default: $RAY_ADDRESS, a cluster `ray start` made here, else a new local one)")
    ray.add_argument("--actors", type=int, default=2, help="engines in the actor pool (default 2)")
    ray.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs each actor reserves (default 1)")
    ray.add_argument("--batch-size", type=int, default=16, help="items per actor call (default 16)")


def run(args) -> int:
    from edgevl.serving.batch import answer_local, list_items, run_batch

    items = list_items(args.input, every=args.every)
    sampling = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    out = Path(args.out)
    if args.ray:
        from edgevl.serving.ray_batch import answer_on_ray

        def answer(todo):
            return answer_on_ray(todo, str(Path(args.bundle).resolve()), args.prompt, sampling, actors=args.actors,
                                 batch_size=args.batch_size, address=args.ray_address,
                                 cpus_per_actor=args.actor_cpus, backend=args.backend, threads=args.threads)

        summary = run_batch(items, out, answer, progress=not args.no_progress)
    else:
        import edgevl

        with edgevl.load(args.bundle, backend=args.backend, threads=args.threads, batching=True,
                         max_batch_size=args.max_batch, verbose=False) as vlm:
            summary = run_batch(items, out, lambda todo: answer_local(vlm, todo, args.prompt, sampling),
                                progress=not args.no_progress)
    print(json.dumps(summary), file=sys.stderr)
    return 0
