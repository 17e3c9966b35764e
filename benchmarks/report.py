"""Raw samples -> result rows (one per variant), the JSON document and the Markdown table.

Every row carries its ratio to PyTorch eager FP32 of the same model and batch
(``speedup_vs_torch``: end-to-end latency when it was measured, else vision latency; the
per-metric ratios are in ``speedups_vs_torch``), and its fraction of the decode ceiling
(measured memory bandwidth / bytes of weights one decode step reads).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from edgevl.benchmarks.machine import decode_ceiling
from edgevl.benchmarks.orchestrate import SetupRun
from edgevl.benchmarks.stats import overhead, ratio, summarize
from edgevl.benchmarks.trust import Trust, judge, load_reason

SCHEMA = "edgevl-bench/1"
# metric -> (sample key, higher is better)
METRICS = {"vision": ("vision_ms", False), "ttft": ("ttft_ms", False), "decode": ("decode_tok_s", True),
           "e2e": ("e2e_ms", False)}
ROW_KEYS = ("model", "tool", "backend", "precision", "batch", "status", "error", "vision_ms_p50", "ttft_ms_p50",
            "decode_tok_s", "e2e_ms_p50", "peak_rss_mb", "size_mb", "accuracy", "speedup_vs_torch")


def _r(x, digits=3):
    return None if x is None else round(float(x), digits)


def _summary_fields(prefix: str, values: list | None, spread_limit: float, warnings: list, label: str,
                    p50_name: str | None = None) -> dict:
    names = {"p50": p50_name or f"{prefix}_p50", "p10": f"{prefix}_p10", "p90": f"{prefix}_p90",
             "p99": f"{prefix}_p99", "n": f"{prefix}_n"}
    if not values:
        return {name: None for name in names.values()}
    s = summarize(values, spread_limit)
    if s.warning(label):
        warnings.append(s.warning(label))
    return {names["p50"]: _r(s.p50), names["p10"]: _r(s.p10), names["p90"]: _r(s.p90), names["p99"]: _r(s.p99),
            names["n"]: s.n}


def rows_for(run: SetupRun, batches, bandwidth_gb_s: float | None, spread_limit: float,
             l3_cache_mb: float | None = None) -> list[dict]:
    setup, facts, finish = run.setup, run.facts, run.finish or {}
    accuracy = (finish.get("accuracy") or {}) if isinstance(finish, dict) else {}
    rows = []
    for batch in batches:
        samples = run.samples.get(batch, {})
        warnings: list[str] = []
        # a worker that failed at batch B still measured the smaller batches before it
        failed_here = run.status != "ok" and (run.failed_batch is None or batch >= run.failed_batch)
        row = {"model": setup.model, "tool": setup.tool, "backend": setup.backend, "precision": setup.precision,
               "batch": batch, "key": f"{setup.key}/b{batch}", "status": "failed" if failed_here else "ok",
               "error": run.error if failed_here else None}
        if run.status != "ok" and not failed_here:
            warnings.append(f"the worker failed later, at batch {run.failed_batch}: {run.error.splitlines()[0]}")
        if row["status"] == "ok" and not samples:
            row.update(status="failed", error="no measurements were taken")
        row.update(_summary_fields("vision_ms", samples.get("vision_ms"), spread_limit, warnings, "vision"))
        row.update(_summary_fields("ttft_ms", samples.get("ttft_ms"), spread_limit, warnings, "ttft"))
        row.update(_summary_fields("decode_tok_s", samples.get("decode_tok_s"), spread_limit, warnings, "decode",
                                   p50_name="decode_tok_s"))
        row.update(_summary_fields("e2e_ms", samples.get("e2e_ms"), spread_limit, warnings, "e2e"))
        at = {pos: _r(summarize(v).p50) for pos, v in sorted(samples.get("decode_tok_s_at", {}).items(),
                                                              key=lambda kv: int(kv[0])) if v}
        row["decode_tok_s_at"] = at or None
        positions = list(at)
        row["decode_position_ratio"] = (_r(at[positions[-1]] / at[positions[0]])
                                        if len(positions) >= 2 and at[positions[0]] else None)
        weight_bytes = facts.get("decoder_weight_bytes")
        ceiling1 = decode_ceiling(bandwidth_gb_s or 0, weight_bytes or 0)
        ceiling = ceiling1 * batch if ceiling1 else None     # a batched step reads the weights once for B tokens
        row.update({
            "peak_rss_mb": _r(run.peak_rss_mb.get(batch), 1),
            "process_peak_rss_mb": _r(run.process_peak_rss_mb, 1),
            "size_mb": _r(facts["size_bytes"] / 1e6, 2) if facts.get("size_bytes") else None,
            "load_ms": _r(facts.get("load_ms"), 1),
            "accuracy": _r(accuracy.get("accuracy"), 4),
            "accuracy_by_task": accuracy.get("by_task"),
            "accuracy_scenes": accuracy.get("n_scenes"),
            "decoder_weight_mb": _r(weight_bytes / 1e6, 2) if weight_bytes else None,
            "decode_ceiling_tok_s": _r(ceiling, 1),
            "decode_ceiling_fraction": _r(row["decode_tok_s"] / ceiling, 4) if ceiling and row["decode_tok_s"] else None,
            # weights that fit in the last-level cache are not re-read from DRAM each step: the
            # bandwidth ceiling then does not bind (edgevl-tiny's decoder is a few MB)
            "weights_fit_in_cache": (weight_bytes / 1e6 < l3_cache_mb * 1.048576) if weight_bytes and l3_cache_mb else None,
            "prompt_tokens": samples.get("prompt_tokens"),
            "image_tokens": facts.get("image_tokens"),
            "execution_precision": facts.get("execution_precision"),
            "note": facts.get("note"),          # what a peer measured, where it differs from edgevl's rows
            "bundle": facts.get("bundle"),
        })
        ov = (finish.get("overhead") if isinstance(finish, dict) else None) if batch == 1 else None
        if ov and ov.get("edgevl_ms") and ov.get("bare_ms"):
            ours, bare = summarize(ov["edgevl_ms"]).p50, summarize(ov["bare_ms"]).p50
            row["vision_overhead"] = {"edgevl_ms_p50": _r(ours), "bare_ms_p50": _r(bare), "pairs": len(ov["bare_ms"]),
                                      "overhead_pct": _r(100 * overhead(ours, bare), 2)}
        else:
            row["vision_overhead"] = None
        if isinstance(finish, dict) and finish.get("error"):
            warnings.append(f"accuracy/overhead not measured: {finish['error']}")
        row["warnings"] = warnings
        row["log"] = run.log
        rows.append(row)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Fill ``speedup_vs_torch`` and ``speedups_vs_torch`` from the PyTorch row of the same model and batch."""
    base = {(r["model"], r["batch"]): r for r in rows if r["tool"] == "pytorch" and r["status"] == "ok"}
    fields = {"vision": "vision_ms_p50", "ttft": "ttft_ms_p50", "decode": "decode_tok_s", "e2e": "e2e_ms_p50"}
    for row in rows:
        ref = base.get((row["model"], row["batch"]))
        ratios = {m: _r(ratio(row.get(f), ref.get(f) if ref else None, METRICS[m][1])) for m, f in fields.items()}
        row["speedups_vs_torch"] = ratios
        row["speedup_vs_torch"] = ratios["e2e"] if ratios["e2e"] is not None else ratios["vision"]
        row["speedup_metric"] = "e2e" if ratios["e2e"] is not None else ("vision" if ratios["vision"] is not None else None)


def judge_ratios(rows: list[dict], runs: list[SetupRun], machine: dict, spread_limit: float) -> None:
    """Give every speed-up (``speedups_trust`` per metric, ``speedup_trust`` for the headline one) and
    decode position ratio (``decode_position_trust``) its verdict from the raw samples and the load."""
    samples = {f"{run.setup.key}/b{batch}": s for run in runs for batch, s in run.samples.items()}
    torch_rows = {(r["model"], r["batch"]): r for r in rows if r["tool"] == "pytorch" and r["status"] == "ok"}
    context = dict(load_before=(machine.get("load_average") or [None])[0],
                   load_after=(machine.get("load_average_after") or [None])[0],
                   cores=machine.get("usable_cores"), spread_limit=spread_limit)
    for row in rows:
        mine, ref_row = samples.get(row["key"], {}), torch_rows.get((row["model"], row["batch"]))
        ref = samples.get(ref_row["key"], {}) if ref_row else {}
        label, ref_label = (f"{row['model']} {name} b{row['batch']}" for name in (variant_label(row), "PyTorch"))
        trusts = {}
        for metric, value in (row.get("speedups_vs_torch") or {}).items():
            if value is None or row is ref_row:
                continue
            key, higher_is_better = METRICS[metric]
            trusts[metric] = judge({f"{ref_label} {metric}": ref.get(key) or [], f"{label} {metric}": mine.get(key) or []},
                                   unit="tok/s" if higher_is_better else "ms", **context).to_dict()
        row["speedups_trust"] = trusts
        row["speedup_trust"] = trusts.get(row.get("speedup_metric"))
        at = row.get("decode_tok_s_at") or {}
        if row.get("decode_position_ratio") is not None:
            ends = (list(at)[0], list(at)[-1])
            row["decode_position_trust"] = judge({f"{label} decode at {p}": mine["decode_tok_s_at"][p] for p in ends},
                                                 unit="tok/s", **context).to_dict()
        else:
            row["decode_position_trust"] = None


# issue 4's runtime targets, checked on every edgevl FP32 row at batch 1
# (name, value, its trust verdict or None, op, limit)
RUNTIME_TARGETS = (
    ("decode tok/s vs PyTorch eager", lambda r: (r.get("speedups_vs_torch") or {}).get("decode"),
     lambda r: (r.get("speedups_trust") or {}).get("decode"), ">=", 1.7),
    ("edgevl vision overhead over the bare session (%)",
     lambda r: (r.get("vision_overhead") or {}).get("overhead_pct"), lambda r: None, "<=", 10.0),
    ("decode tok/s at the far position / at the near one", lambda r: r.get("decode_position_ratio"),
     lambda r: r.get("decode_position_trust"), ">=", 0.8),
)


def target_checks(rows: list[dict]) -> list[dict]:
    checks = []
    for r in rows:
        if r["tool"] != "edgevl" or r["precision"] != "fp32" or r["batch"] != 1 or r["status"] != "ok":
            continue
        for name, get, get_trust, op, limit in RUNTIME_TARGETS:
            value = get(r)
            ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
            checks.append({"model": r["model"], "backend": r["backend"], "check": name, "value": value,
                           "target": f"{op} {limit}", "ok": ok, "trust": get_trust(r)})
    return checks


def document(runs: list[SetupRun], batches, machine: dict, bandwidth: dict, settings: dict, extra: dict | None = None) -> dict:
    rows = [row for run in runs for row in rows_for(run, batches, bandwidth.get("copy_gb_s"),
                                                     settings.get("spread_limit", 0.25), machine.get("l3_cache_mb"))]
    add_speedups(rows)
    judge_ratios(rows, runs, machine, settings.get("spread_limit", 0.25))
    return {"schema": SCHEMA, "machine": machine, "bandwidth": bandwidth, "settings": settings,
            "variants": rows, "runtime_targets": target_checks(rows), **(extra or {})}


def write_json(doc: dict, path: str | Path) -> Path:
    return _atomic_write(Path(path), json.dumps(doc, indent=2) + "\n")


def _atomic_write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


# -- Markdown ------------------------------------------------------------------------------------
def _fmt(x, digits: int = 1, suffix: str = "") -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}{suffix}"


def short_error(error: str | None, limit: int = 180) -> str:
    """One table cell: newlines folded, C++ source locations ("Exception from /path/x.cpp:45:") dropped."""
    import re

    text = re.sub(r"Exception from \S+:\d+:\s*", "", error or "failed")
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def variant_label(row: dict) -> str:
    if row["tool"] == "pytorch":
        return "PyTorch eager fp32"
    label = f"{row['backend']} {row['precision']}"
    return label if row["tool"] == "edgevl" else f"{label} ({row['tool']})"


def markdown(doc: dict) -> str:
    m, bw, s = doc["machine"], doc["bandwidth"], doc["settings"]
    lines = [
        f"Machine: {m['cpu']}, {m['usable_cores']} cores, {m.get('memory_gb')} GB, flags "
        f"{' '.join(m['flags']) or 'none of note'}; memory copy {bw.get('copy_gb_s')} GB/s "
        f"(read {bw.get('read_gb_s')} GB/s). {s['threads'] or m['usable_cores']} threads; "
        f"{s['new_tokens']} new tokens, greedy; medians of interleaved rounds.",
        "",
        "| model | variant | batch | vision ms | TTFT ms | decode tok/s | e2e ms | x PyTorch | "
        "% of decode ceiling | peak RSS MB | size MB | accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["variants"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {variant_label(r)} | {r['batch']} | failed: {short_error(r['error'])} ||||||||| ")
            continue
        speed = r["speedup_vs_torch"]
        untrusted = "" if Trust.from_dict(r.get("speedup_trust")).ok else " !"
        speed_text = "1.00x (ref)" if r["tool"] == "pytorch" else (f"{speed:.2f}x {r['speedup_metric']}{untrusted}"
                                                                   if speed else "–")
        frac = r["decode_ceiling_fraction"]
        acc = r["accuracy"]
        lines.append(
            f"| {r['model']} | {variant_label(r)} | {r['batch']} | {_fmt(r['vision_ms_p50'], 2)} | "
            f"{_fmt(r['ttft_ms_p50'], 1)} | {_fmt(r['decode_tok_s'], 1)} | {_fmt(r['e2e_ms_p50'], 1)} | {speed_text} | "
            f"{_fmt(frac * 100 if frac is not None else None, 0, '%')} | {_fmt(r['peak_rss_mb'], 0)} | "
            f"{_fmt(r['size_mb'], 1)} | {_fmt(acc * 100 if acc is not None else None, 1, '%')} |")
    load, cores = (m.get("load_average") or [None])[0], m.get("usable_cores") or 1
    if load_reason(load, None, cores, limit=0.5 * cores):     # stricter than for ratios: absolute numbers
        lines.insert(1, f"\n**The machine was busy** (load average {load:.1f} on {m.get('usable_cores')} cores at the "
                        "start): absolute numbers are unreliable, PyTorch's OpenMP threads most of all; rerun on a "
                        "quiet machine before quoting.")
    checks = doc.get("runtime_targets") or []
    if checks:
        lines += ["", "| model | backend | runtime target | value | target | met |", "|---|---|---|---:|---|---|"]
        for c in checks:
            met = {True: "yes", False: "**no**", None: "not measured"}[c["ok"]]
            if c["ok"] is not None and not Trust.from_dict(c.get("trust")).ok:
                met += " (not trustworthy)"
            value = "–" if c["value"] is None else f"{c['value']:.2f}"
            lines.append(f"| {c['model']} | {c['backend']} | {c['check']} | {value} | {c['target']} | {met} |")
    notes = _notes(doc)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _notes(doc: dict) -> list[str]:
    notes, noted = [], set()
    for r in doc["variants"]:
        if r["status"] != "ok":
            continue
        label = f"{r['model']} {variant_label(r)} b{r['batch']}"
        setup_key = r["key"].rsplit("/", 1)[0]
        if r.get("note") and setup_key not in noted:        # once per setup, not per batch
            noted.add(setup_key)
            notes.append(f"- {label}: {r['note']}")
        if r.get("decode_position_ratio") is not None:
            at = r["decode_tok_s_at"]
            first, last = list(at)[0], list(at)[-1]
            notes.append(f"- {label}: decode {at[last]:.1f} tok/s at position {last} vs {at[first]:.1f} at {first} "
                         f"({r['decode_position_ratio']:.2f}x"
                         f"{'' if Trust.from_dict(r.get('decode_position_trust')).ok else ' !'})")
        if r.get("vision_overhead"):
            o = r["vision_overhead"]
            notes.append(f"- {label}: edgevl vision {o['edgevl_ms_p50']:.3f} ms vs bare session {o['bare_ms_p50']:.3f} ms "
                         f"({o['overhead_pct']:+.1f}%, {o['pairs']} alternated pairs)")
        for w in r.get("warnings", []):
            if "wide spread" not in w:
                notes.append(f"- {label}: {w}")
    wide = [f"{r['model']} {variant_label(r)} b{r['batch']} ({', '.join(w.split(':')[0] for w in r['warnings'] if 'wide spread' in w)})"
            for r in doc["variants"] if any("wide spread" in w for w in r.get("warnings", []))]
    if wide:
        limit = doc.get("settings", {}).get("spread_limit", 0.25)
        notes.append(f"- wide spread ((p90-p10)/median > {limit:.0%}; p10/p90 in the JSON): " + "; ".join(wide))
    shown = [t for r in doc["variants"] for t in (r.get("speedup_trust"), r.get("decode_position_trust"))]
    shown += [c.get("trust") for c in doc.get("runtime_targets") or []]
    flagged = sum((Trust.from_dict(t) for t in shown), Trust())
    if not flagged.ok:
        notes.append(f"- ratios marked ! or (not trustworthy): {flagged.flag()}")
    cached = sorted({r["model"] for r in doc["variants"] if r.get("weights_fit_in_cache")})
    if cached:
        notes.append(f"- {', '.join(cached)}: the decoder's weights fit in the {doc['machine'].get('l3_cache_mb')} MB "
                     "last-level cache, so the DRAM-bandwidth decode ceiling does not bind there")
    notes += build_time_notes(doc.get("prepared") or {})
    for p in doc.get("peer_notes", []):
        notes.append(f"- peer {p}")
    return notes


def build_time_notes(prepared: dict) -> list[str]:
    """Per model: how long preparing its edgevl bundles took, and how many were built (not reused
    from the cache). A cold-cache run's line is the time a user pays to build every variant."""
    per_model: dict[str, list] = {}
    for key, p in prepared.items():
        model, _, rest = key.partition("/")
        if ":" in rest.partition("/")[0] or rest.startswith("pytorch") or not isinstance(p, dict):
            continue                                  # peers and the PyTorch reference build nothing of edgevl's
        entry = per_model.setdefault(model, [0.0, 0, 0])
        entry[0] += float(p.get("prepare_s") or 0.0)
        entry[1 if not p.get("reused") else 2] += 1
    return [f"- {model}: edgevl bundles prepared in {s:.0f} s ({built} built, {reused} reused from the cache)"
            for model, (s, built, reused) in per_model.items()]
