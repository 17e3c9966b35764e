"""A batch-1 decode step of the portable decoder vs the ONNX Runtime-lowered one (FP32, INT8-wo,
INT4-wo), at two cache positions, in one process.

    python benchmarks/decoder_lowered.py --bundle fp32=DIR --bundle int8-wo=DIR --bundle int4-wo=DIR \
        --positions 64 512 [--prefill 128] [--threads 2] --json-out OUT.json --md-out OUT.md

Each DIR is a bundle written by ``edgevl.exporters.lower.onnxruntime_decoder.lower_decoder``: it
holds both graphs (``parts.decoder.onnx`` and ``parts.decoder.artifacts.onnxruntime``). A step is
what ``Engine.decode`` does after embedding the token: ``runner.infer`` on the KVCache's views,
then ``KVCache.write``; the cache is put back to the same position after each step, and its
capacity is the runtime's (the power of two above position + 1). Positions and variants
alternate round by round: each round runs ``--burst`` back-to-back steps of each (position,
variant) (the first is not counted: ORT's threads wake up), pausing between them so ORT's
spinning threads go idle (MEASURED.md gotcha 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np


def load_variants(bundles: dict[str, str], threads: int) -> dict:
    from edgevl.bundle import load_bundle
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    variants = {}
    for precision, path in bundles.items():
        bundle = load_bundle(path, verify=False)
        if "onnxruntime" not in bundle.parts["decoder"].get("artifacts", {}):
            raise SystemExit(f"{path} has no lowered decoder (parts.decoder.artifacts.onnxruntime): run lower_decoder")
        for graph, file in (("portable", bundle.part_file("decoder")),
                            ("lowered", bundle.part_file("decoder", "onnxruntime"))):
            runner = OnnxRuntimeRunner(file, precision=bundle.precision, threads=threads).activate()
            variants[(precision, graph)] = (bundle, runner)
    return variants


def measure(variants: dict, positions: list[int], rounds: int, burst: int, seed: int = 0) -> dict:
    """Median ms per step for every (position, variant); positions and variants alternate in
    every round, so a change in the machine's load falls on all of them alike."""
    from edgevl.runtimes.kv_cache import KVCache

    rng = np.random.default_rng(seed)
    caches, embeds = {}, {}
    for position in positions:
        for key, (bundle, _) in variants.items():
            spec = bundle.manifest["decoder"]
            cache = KVCache(spec["n_layers"], spec["n_kv_heads"], spec["head_dim"], slots=1, capacity=position + 1,
                            max_capacity=spec["max_position"])
            for arr in cache.keys + cache.values:
                arr[:, :, :position] = rng.standard_normal(arr[:, :, :position].shape).astype(np.float32)
            cache.length[:] = position
            caches[position, key] = cache
            embeds[position, key] = (rng.standard_normal((1, 1, spec["hidden_dim"])) * 0.05).astype(np.float32)
    times: dict = {k: [] for k in caches}
    loads = [os.getloadavg()[0]]
    rows = slice(0, 1)
    for _ in range(rounds):
        for (position, key), cache in caches.items():
            runner = variants[key][1]
            for i in range(burst):
                t = time.perf_counter()
                out = runner.infer({"inputs_embeds": embeds[position, key], **cache.feeds(rows)})
                cache.write(out, rows)
                ms = (time.perf_counter() - t) * 1e3
                cache.length[:] = position
                if i:
                    times[position, key].append(ms)
            time.sleep(0.2)
        loads.append(os.getloadavg()[0])
    results: dict = {}
    for position in positions:
        results[position] = {
            "capacity": caches[position, next(iter(variants))].capacity, "load_1min": [round(x, 2) for x in loads],
            "ms": {f"{p}/{g}": {"median": round(statistics.median(v), 2), "p25": round(float(np.percentile(v, 25)), 2),
                                "p75": round(float(np.percentile(v, 75)), 2), "n": len(v)}
                   for (pos, (p, g)), v in times.items() if pos == position}}
    return results


def measure_prefill(variants: dict, n_tokens: int, rounds: int, seed: int = 1) -> dict:
    """Median ms of a batch-1 prefill of ``n_tokens`` into an empty cache, variants alternating."""
    from edgevl.runtimes.kv_cache import KVCache

    rng = np.random.default_rng(seed)
    times: dict = {key: [] for key in variants}
    loads = [os.getloadavg()[0]]
    for _ in range(rounds):
        for key, (bundle, runner) in variants.items():
            spec = bundle.manifest["decoder"]
            cache = KVCache(spec["n_layers"], spec["n_kv_heads"], spec["head_dim"], slots=1, capacity=n_tokens + 1,
                            max_capacity=spec["max_position"])
            embeds = (rng.standard_normal((1, n_tokens, spec["hidden_dim"])) * 0.05).astype(np.float32)
            t = time.perf_counter()
            cache.write(runner.infer({"inputs_embeds": embeds, **cache.feeds(slice(0, 1))}), slice(0, 1))
            times[key].append((time.perf_counter() - t) * 1e3)
            time.sleep(0.3)
        loads.append(os.getloadavg()[0])
    return {"tokens": n_tokens, "load_1min": [round(x, 2) for x in loads],
            "ms": {f"{p}/{g}": {"median": round(statistics.median(v), 1), "min": round(min(v), 1),
                                "max": round(max(v), 1), "n": len(v)} for (p, g), v in times.items()}}


def markdown(results: dict, prefill: dict | None, variants: dict, machine: dict, args) -> str:
    precisions = list(dict.fromkeys(p for p, _ in variants))
    bundle = next(iter(variants.values()))[0]
    entry = bundle.parts["decoder"]["lowered"]["onnxruntime"]
    lines = [f"{bundle.manifest['model']['name']} decoder ({bundle.manifest['decoder']['n_layers']} layers), "
             f"ONNX Runtime {entry.get('onnxruntime')}, {args.threads} intra-op thread(s), spinning on; graph nodes: "
             f"portable {entry['portable_nodes']}, lowered {entry['nodes']}.", ""]
    loads = []
    if results:
        positions = list(results)
        loads += [x for p in positions for x in results[p]["load_1min"]]
        lines += ["Batch-1 decode step (`runner.infer` + `KVCache.write`, as `Engine.decode` runs it after the "
                  f"embedding). Median ms per step (p25-p75) of {args.rounds} rounds x {args.burst - 1} counted "
                  "back-to-back steps per variant and position, all alternating in one process. Cache capacity: "
                  + ", ".join(f"{results[p]['capacity']} at position {p}" for p in positions) + ".", ""]
        lo, hi = positions[0], positions[-1]
        head = "| weights | " + " | ".join(f"portable @{p} | lowered @{p} | lowered speed-up @{p}" for p in positions)
        head += f" | portable: speed @{hi} / @{lo} | lowered: speed @{hi} / @{lo} |"
        lines += [head, "|---|" + "---:|" * (3 * len(positions) + 2)]
        for prec in precisions:
            cells = []
            for p in positions:
                ms = results[p]["ms"]
                a, b = ms[f"{prec}/portable"], ms[f"{prec}/lowered"]
                cells += [f"{a['median']:.1f} ({a['p25']:.1f}-{a['p75']:.1f})",
                          f"{b['median']:.1f} ({b['p25']:.1f}-{b['p75']:.1f})", f"{a['median'] / b['median']:.2f}x"]
            first, last = results[lo]["ms"], results[hi]["ms"]
            for graph in ("portable", "lowered"):
                cells.append(f"{first[f'{prec}/{graph}']['median'] / last[f'{prec}/{graph}']['median']:.2f}x")
            lines.append(f"| {prec} | " + " | ".join(cells) + " |")
        lines.append("")
    if prefill:
        loads += prefill["load_1min"]
        lines += [f"Batch-1 prefill of {prefill['tokens']} tokens into an empty cache (`runner.infer` + "
                  f"`KVCache.write`): median ms (min-max) of {args.rounds} rounds, variants alternating.", "",
                  "| weights | portable | lowered | lowered speed-up |", "|---|---:|---:|---:|"]
        for prec in precisions:
            a, b = prefill["ms"][f"{prec}/portable"], prefill["ms"][f"{prec}/lowered"]
            lines.append(f"| {prec} | {a['median']:.0f} ({a['min']:.0f}-{a['max']:.0f}) | "
                         f"{b['median']:.0f} ({b['min']:.0f}-{b['max']:.0f}) | {a['median'] / b['median']:.2f}x |")
        lines.append("")
    busy = max(loads) > 0.5 * (machine["cores"] or 1) + 0.5
    lines += [f"Machine: {machine['cpu']}, {machine['cores']} cores (flags {', '.join(machine['flags'])}), "
              f"onnxruntime {machine.get('libraries', {}).get('onnxruntime', '?')}. "
              f"1-minute load average during the run: {min(loads):.1f}-{max(loads):.1f} on {machine['cores']} cores"
              + (" -- other processes were running: absolute times are inflated and noisy; compare the ratios "
                 "inside a row (same rounds, alternating)." if busy else "."), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", required=True, help="PRECISION=DIR of a lowered bundle")
    parser.add_argument("--positions", type=int, nargs="*", default=[64, 512], help="decode at these cache positions")
    parser.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--md-out")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    from edgevl.benchmarks.machine import machine_info

    bundles = dict(item.split("=", 1) for item in args.bundle)
    variants = load_variants(bundles, args.threads)
    results = measure(variants, args.positions, args.rounds, args.burst) if args.positions else {}
    prefill = measure_prefill(variants, args.prefill, args.rounds) if args.prefill else None
    machine = machine_info()
    text = markdown(results, prefill, variants, machine, args)
    print(text)
    if args.md_out:
        Path(args.md_out).write_text(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine, "bundles": bundles, "threads": args.threads,
                                                   "decode": results, "prefill": prefill}, indent=2) + "\n")
    for _, runner in variants.values():
        runner.close()


if __name__ == "__main__":
    main()
