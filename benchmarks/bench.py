"""``edgevl bench`` as a function: plan, prepare, measure interleaved, write JSON/Markdown/plots."""

from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from pathlib import Path

from edgevl.benchmarks.variants import Plan, Settings, plan_setups

DEFINITIONS = {
    "vision_ms": "vision encoder + projector on preprocessed pixels, per call of `batch` images",
    "ttft_ms": "preprocess + tokenize + vision + prefill + first greedy token, `batch` prompts at once",
    "decode_tok_s": "greedy decode tokens/s after the first token (all rows of the batch together), "
                    "exactly new_tokens, stop tokens ignored",
    "e2e_ms": "ttft + decode of the remaining new_tokens - 1 tokens",
    "decode_tok_s_at": "decode tokens/s with the KV cache already holding that many positions (batch 1 rows only "
                       "where generation is measured); positions are clamped to the model's context",
    "peak_rss_mb": "peak resident memory (VmHWM, what /usr/bin/time -v calls maximum resident set size) of the "
                   "variant's own worker process after its phase for this batch and all smaller ones; "
                   "process_peak_rss_mb is its whole life incl. the accuracy and overhead checks",
    "size_mb": "model files on disk (bundle graphs and weights; safetensors for PyTorch)",
    "speedup_vs_torch": "ratio to PyTorch eager FP32 of the same model and batch: end to end when measured, else vision",
    "decode_ceiling_tok_s": "memory copy bandwidth / bytes of decoder weights read per step, times batch "
                            "(KV-cache reads ignored; meaningless where weights_fit_in_cache)",
    "vision_overhead": "edgevl Engine.encode_images vs the bare backend call on the same compiled graph, alternated",
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGEVL_CACHE", Path.home() / ".cache" / "edgevl")) / "bench"


def run_bench(models: list[str], targets: list[str], precisions: list[str], batches: tuple[int, ...],
              settings: Settings, json_path: str | Path, markdown_path: str | Path | None = None,
              plots_dir: str | Path | None = None, peers: list[str] | None = None,
              cache_dir: str | Path | None = None, rebuild: bool = False, progress: bool = True,
              prepare_only: bool = False, log=lambda m: print(m, file=sys.stderr)) -> dict:
    from edgevl.benchmarks.machine import copy_bandwidth, machine_info
    from edgevl.benchmarks.orchestrate import run_plan
    from edgevl.benchmarks.prepare import Preparer
    from edgevl.benchmarks.report import document, markdown, write_json

    if progress:                        # keep log lines from tearing the progress bar
        from tqdm import tqdm

        log = lambda m: tqdm.write(str(m), file=sys.stderr)  # noqa: E731
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    threads = settings.threads or len(os.sched_getaffinity(0))
    from dataclasses import replace

    settings = replace(settings, threads=threads)
    plan = Plan(plan_setups(models, targets, precisions, peers), batches, settings)
    machine = machine_info()
    bandwidth = copy_bandwidth(threads=threads)
    log(f"bench: {len(plan.variants)} variants ({len(plan.setups)} worker processes), "
        f"{settings.rounds} rounds, budget {settings.budget_s:.0f} s; memory copy {bandwidth['copy_gb_s']} GB/s")
    log_dir = cache_dir / "logs" / started.strftime("%Y%m%d-%H%M%S")
    preparer = Preparer(cache_dir, threads, rebuild=rebuild, log=log)
    runs = run_plan(plan, preparer, log_dir=log_dir, progress=progress, log=log, prepare_only=prepare_only)
    if prepare_only:
        return {"prepared": {r.setup.key: ({"error": r.error} if r.status != "ok" else r.prepared) for r in runs},
                "duration_s": round(time.perf_counter() - t0, 1)}
    machine["load_average_after"] = list(os.getloadavg())       # the ratios' verdicts need it (trust.py)
    doc = document(runs, plan.batches, machine, bandwidth, settings.to_dict(), extra={
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "command": " ".join(sys.argv),
        "logs": str(log_dir),
        "definitions": DEFINITIONS,
        "peer_notes": _peer_notes(peers or []),
        "prepared": {r.setup.key: r.prepared for r in runs},
    })
    write_json(doc, json_path)
    if markdown_path:
        from edgevl.benchmarks.report import _atomic_write

        _atomic_write(Path(markdown_path), markdown(doc))
    if plots_dir:
        from edgevl.benchmarks.plots import plot_all

        plot_all(doc, plots_dir)
    return doc


def _peer_notes(peers: list[str]) -> list[str]:
    from edgevl.benchmarks.peers import PEERS

    return [f"{name}: {PEERS[name].what}" for name in peers if name in PEERS]
