"""edgevl bench: every backend and precision side by side, against PyTorch eager FP32.

Each (model, tool, backend, precision) runs in its own worker process (its own peak memory, a
crash fails one row); workers are measured in interleaved rounds so machine drift cancels in
the ratios. See benchmarks/orchestrate.py for the procedure and benchmarks/report.py for the
fields of the JSON.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="comma-separated: edgevl-tiny, smolvlm-256m-shaped, llava-shaped, or checkpoint "
                        "directories")
    p.add_argument("--targets", default="onnxruntime,openvino", help="backends (default onnxruntime,openvino)")
    p.add_argument("--precisions", default="fp32", help="e.g. fp32,int8; int8@MODEL limits a precision to one model")
    p.add_argument("--batch", default="1,8", help="vision batch sizes; every size is a row (default 1,8)")
    p.add_argument("--generate-batches", default="1",
                   help="batch sizes at which TTFT/decode/e2e are measured too (default 1)")
    p.add_argument("--peers", default="", help="peer tools to measure too, e.g. ort-quantize-dynamic,optimum-intel-int8,"
                                               "llama-cpp-q8_0,llama-cpp-q4_0,ort-genai-int4,ort-genai-int8 "
                                               "(benchmarks/peers.py lists them and what each needs)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here (required unless --prepare-only)")
    p.add_argument("--markdown", default=None, help="write the README table here")
    p.add_argument("--plots", default=None, help="write PNG plots into this directory")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="seconds of measuring for the whole run, split over rounds and variants (builds, loads, "
                        "accuracy not included); each variant still gets at least one sample per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--new-tokens", type=int, default=32, help="fixed answer length (default 32)")
    p.add_argument("--positions", default="64,512", help="decode speed measured at these cache positions")
    p.add_argument("--accuracy-scenes", type=int, default=200,
                   help="held-out scenes for accuracy on edgevl-tiny (0 skips it)")
    p.add_argument("--overhead-pairs", type=int, default=30, help="alternated edgevl/bare vision calls")
    p.add_argument("--threads", type=int, default=None, help="threads per backend (default: all usable cores)")
    p.add_argument("--cache-dir", default=None, help="bundle cache (default $EDGEVL_CACHE/bench or ~/.cache/edgevl/bench)")
    p.add_argument("--rebuild", action="store_true", help="rebuild bundles even when cached")
    p.add_argument("--spread-limit", type=float, default=0.25, help="warn when (p90-p10)/median exceeds this")
    p.add_argument("--prepare-only", action="store_true",
                   help="build (or check) every bundle into the cache and stop; a later run reuses them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from edgevl.benchmarks.bench import run_bench
    from edgevl.benchmarks.report import markdown
    from edgevl.benchmarks.variants import Settings, parse_batches, parse_list
    from edgevl.errors import ConfigError

    try:
        positions = tuple(int(p) for p in parse_list(args.positions, "positions"))
        generate_batches = tuple(int(b) for b in parse_list(args.generate_batches, "generate-batches"))
    except ValueError as e:
        raise ConfigError(f"--positions and --generate-batches take comma-separated integers ({e})") from e
    if not args.json_path and not args.prepare_only:
        raise ConfigError("--json PATH is required (where the results go), unless --prepare-only")
    if args.rounds < 1 or args.budget_s <= 0 or args.new_tokens < 2:
        raise ConfigError("need --rounds >= 1, --budget-s > 0 and --new-tokens >= 2")
    settings = Settings(new_tokens=args.new_tokens, positions=positions, rounds=args.rounds, budget_s=args.budget_s,
                        generate_batches=generate_batches, threads=args.threads,
                        accuracy_scenes=args.accuracy_scenes, overhead_pairs=args.overhead_pairs,
                        spread_limit=args.spread_limit)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    doc = run_bench(parse_list(args.model, "model"), parse_list(args.targets, "targets"),
                    parse_list(args.precisions, "precisions"), parse_batches(args.batch), settings,
                    args.json_path, args.markdown, args.plots, peers=peers, cache_dir=args.cache_dir,
                    rebuild=args.rebuild, progress=not args.no_progress, prepare_only=args.prepare_only)
    if args.prepare_only:
        import json

        print(json.dumps(doc, indent=2))
        # a peer that cannot run a model is an answer, not a failure of the preparation
        failed = [k for k, v in doc["prepared"].items() if "error" in v and "PeerCannotRun" not in v["error"]]
        return 1 if failed else 0
    print(markdown(doc))
    failed = [r for r in doc["variants"] if r["status"] != "ok"]
    print(f"edgevl bench: {len(doc['variants']) - len(failed)} variants measured, {len(failed)} failed, "
          f"{doc['duration_s']:.0f} s; JSON {args.json_path}")
    return 0
