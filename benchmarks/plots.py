"""PNG plots of a benchmark document (matplotlib, Agg backend: no display needed).

- ``latency.png``: vision and TTFT medians by variant, p10-p90 as error bars, one panel per model;
- ``tokens_per_s.png``: decode tokens/s by variant, with the memory-bandwidth ceiling drawn;
- ``accuracy_vs_speed.png``: accuracy against end-to-end speed-up over PyTorch (edgevl-tiny).
"""

from __future__ import annotations

from pathlib import Path

from edgevl.benchmarks.report import variant_label


def _ok(doc, batch=None):
    return [r for r in doc["variants"] if r["status"] == "ok" and (batch is None or r["batch"] == batch)]


def _models(rows):
    return list(dict.fromkeys(r["model"] for r in rows))


def _errors(rows, key, p50_key=None):
    """p10..p90 as matplotlib's asymmetric error bars around the median."""
    p50_key = p50_key or key + "_p50"
    lo = [max(0.0, r[p50_key] - (r.get(key + "_p10") or r[p50_key])) for r in rows]
    hi = [max(0.0, (r.get(key + "_p90") or r[p50_key]) - r[p50_key]) for r in rows]
    return [lo, hi]


def plot_all(doc: dict, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    rows = _ok(doc)
    models = _models(rows)
    if not rows:
        return written

    # latency: vision (every batch) and TTFT (where measured)
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 3.2 * len(models) + 0.8), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        mrows = [r for r in rows if r["model"] == model]
        labels = [f"{variant_label(r)} b{r['batch']}" for r in mrows]
        y = range(len(mrows))
        vis = [r for r in mrows if r["vision_ms_p50"] is not None]
        ax.barh([i - 0.2 for i, r in zip(y, mrows) if r["vision_ms_p50"] is not None],
                [r["vision_ms_p50"] for r in vis], height=0.4, xerr=_errors(vis, "vision_ms") if vis else None,
                label="vision encoder", color="#4C72B0")
        tt = [r for r in mrows if r["ttft_ms_p50"] is not None]
        ax.barh([i + 0.2 for i, r in zip(y, mrows) if r["ttft_ms_p50"] is not None],
                [r["ttft_ms_p50"] for r in tt], height=0.4, xerr=_errors(tt, "ttft_ms") if tt else None,
                label="time to first token", color="#DD8452")
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms (median, p10-p90)")
        ax.set_title(model)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    written.append(_save(fig, out / "latency.png"))

    # decode tokens/s with the bandwidth ceiling
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 3.0 * len(models) + 0.8), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        mrows = [r for r in rows if r["model"] == model and r["decode_tok_s"] is not None]
        if not mrows:
            ax.set_visible(False)
            continue
        labels = [f"{variant_label(r)} b{r['batch']}" for r in mrows]
        ax.barh(range(len(mrows)), [r["decode_tok_s"] for r in mrows], xerr=_errors(mrows, "decode_tok_s", "decode_tok_s")
                if all(r.get("decode_tok_s_p10") is not None for r in mrows) else None, color="#55A868")
        for i, r in enumerate(mrows):
            if r.get("decode_ceiling_tok_s"):
                ax.plot([r["decode_ceiling_tok_s"]] * 2, [i - 0.4, i + 0.4], color="black", lw=1.5)
        ax.set_yticks(range(len(mrows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"decode tokens/s (median); black mark: bandwidth ceiling at {doc['bandwidth'].get('copy_gb_s')} GB/s")
        ax.set_title(model)
    fig.tight_layout()
    written.append(_save(fig, out / "tokens_per_s.png"))

    # accuracy vs speed
    acc = [r for r in rows if r.get("accuracy") is not None and r.get("speedup_vs_torch") is not None]
    if acc:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        from edgevl.benchmarks.trust import Trust

        for r in acc:
            trusted = Trust.from_dict(r.get("speedup_trust")).ok       # hollow, "(!)": see the Markdown notes
            ax.scatter(r["speedup_vs_torch"], 100 * r["accuracy"], s=40, **({} if trusted else {"facecolors": "none",
                                                                                             "edgecolors": "C3"}))
            ax.annotate(f"{r['model']} {variant_label(r)} b{r['batch']}{'' if trusted else ' (!)'}",
                        (r["speedup_vs_torch"], 100 * r["accuracy"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("speed-up over PyTorch eager FP32 (end to end, or vision); hollow (!): not trustworthy")
        ax.set_ylabel("exact-match accuracy, held-out scenes (%)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out / "accuracy_vs_speed.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
