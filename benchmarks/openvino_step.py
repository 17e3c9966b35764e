"""OpenVINO decode with and without the static decode-step model, against PyTorch eager FP32.

    python benchmarks/openvino_step.py --model edgevl-tiny=BUNDLE_DIR \
        --model smolvlm-256m-shaped=BUNDLE_DIR --cache ~/.cache/edgevl/bench \
        --json-out benchmarks/results/openvino_step.json --md-out benchmarks/results/openvino_step.md

BUNDLE_DIR is an OpenVINO bundle of that model (``edgevl bench`` keeps its builds in
``CACHE/bundles``). For each model, in one process: PyTorch eager, the OpenVINO runner with
``static_step=False`` (every call on the dynamic-shape decoder) and with ``static_step=True``
(single-sequence decode steps on the batch-1, one-token compiled model), decoding ``--steps``
tokens from cache position ``--position``, interleaved round by round with a pause between
variants. Reported: tokens/s over the steps (median of rounds, with min-max), ratio to PyTorch,
and the resident memory each OpenVINO variant added when it loaded (the static model's price:
a second copy of the decoder's weights).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def measure(name: str, bundle: Path, cache: Path, rounds: int, steps: int, position: int, threads: int) -> dict:
    from edgevl.benchmarks.machine import load_now
    from edgevl.benchmarks.models import resolve_model
    from edgevl.benchmarks.trust import judge
    from edgevl.benchmarks.worker import make_subject

    model = resolve_model(name, cache)
    kind = "pytorch-tiny" if model.kind == "edgevl-tiny" else "pytorch-hf"
    specs = {"pytorch eager": {"kind": kind, "checkpoint": str(model.checkpoint), "threads": threads}}
    for label, setting in (("openvino dynamic", False), ("openvino static step", True)):
        specs[label] = {"kind": "edgevl", "bundle": str(bundle), "backend": "openvino", "precision": "fp32",
                        "threads": threads, "options": {"static_step": setting}}
    subjects, added_mb = {}, {}
    for label, spec in specs.items():
        gc.collect()
        before = rss_mb()
        subjects[label] = make_subject(spec)
        subjects[label]._load()
        subjects[label].decode_at(position, 3)                 # first calls pay for shapes and pages
        added_mb[label] = round(rss_mb() - before, 1)
    tok_s: dict[str, list[float]] = {label: [] for label in subjects}
    load_before = load_now()
    for _ in range(rounds):
        for label, subject in subjects.items():
            ms = subject.decode_at(position, steps)[1:]
            tok_s[label].append(1e3 * len(ms) / sum(ms))
            time.sleep(0.3)
    for subject in subjects.values():
        subject.close()
    load_after = load_now()
    base = statistics.median(tok_s["pytorch eager"])
    rows = {label: {"tok_s": round(statistics.median(v), 2), "min": round(min(v), 2), "max": round(max(v), 2),
                    "x_pytorch": round(statistics.median(v) / base, 3), "rounds": [round(x, 2) for x in v],
                    "rss_added_mb": added_mb[label],
                    "x_pytorch_trust": judge({"pytorch eager": tok_s["pytorch eager"], label: v}, load_before=load_before,
                                             load_after=load_after, unit="tok/s").to_dict()}
            for label, v in tok_s.items()}
    return {"model": name, "bundle": str(bundle), "position": position, "steps": steps, "rows": rows}


def markdown(results: list[dict], machine: dict, args) -> str:
    lines = ["# OpenVINO decode: dynamic-shape decoder vs the static decode-step model", "",
             f"One process per model, {args.threads} threads, PyTorch eager FP32 in the run; decode from cache "
             f"position {args.position}, tokens/s over each model's steps (first step dropped), median of "
             f"{args.rounds} interleaved rounds (min-max). `rss added` is the resident memory the variant "
             "added when it loaded. Machine: " + f"{machine.get('cpu', '?')} (CPU model {machine.get('cpu_model_number', '?')}, "
             f"{', '.join(machine.get('flags', []))}), {machine.get('cores', '?')} cores, OpenVINO "
             f"{machine.get('libraries', {}).get('openvino', '?')}.", ""]
    for r in results:
        lines += [f"## {r['model']} ({r['steps']} steps per round)", "", "| variant | decode tok/s | min-max | x PyTorch | rss added (MB) |",
                  "|---|---:|---:|---:|---:|"]
        for label, row in r["rows"].items():
            lines.append(f"| {label} | {row['tok_s']:.1f} | {row['min']:.1f}-{row['max']:.1f} | "
                         f"{x_pytorch(row)} | {row['rss_added_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def x_pytorch(row: dict) -> str:
    """'1.23x', flagged with the reasons where the rounds or the machine's load make it untrustworthy."""
    from edgevl.benchmarks.trust import Trust, format_ratio

    return format_ratio(row["x_pytorch"], Trust.from_dict(row.get("x_pytorch_trust")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="NAME=OPENVINO_BUNDLE_DIR (repeatable)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "edgevl" / "bench"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=0, help="decode steps per round (0: 300 tiny, 40 others)")
    p.add_argument("--position", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out")
    p.add_argument("--md-out")
    args = p.parse_args(argv)
    from edgevl.benchmarks.machine import machine_info

    results = []
    for item in args.model:
        name, _, bundle = item.partition("=")
        steps = args.steps or (300 if name == "edgevl-tiny" else 40)
        results.append(measure(name, Path(bundle), Path(args.cache), args.rounds, steps, args.position, args.threads))
        for label, row in results[-1]["rows"].items():
            print(f"{name:22s} {label:22s} {row['tok_s']:8.1f} tok/s  +{row['rss_added_mb']:.0f} MB  {x_pytorch(row)}")
    machine = machine_info()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine, "results": results,
                                                   "settings": vars(args)}, indent=1))
    if args.md_out:
        Path(args.md_out).write_text(markdown(results, machine, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
