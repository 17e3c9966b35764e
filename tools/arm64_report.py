"""report.json and summary.md under benchmarks/results/arm64 from the x86 and aarch64 results.

The README's "Verified on" table is generated here too, so what the README claims is what the
last run of tools/arm64_check.sh showed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

PROFILE_NAMES = {
    "a57": "Cortex-A57 (Jetson Nano / TX1 / TX2 class: ARMv8.0, no dot product)",
    "a76": "Cortex-A76 (closest qemu 7.2 model to Jetson Orin's Cortex-A78AE: ARMv8.2, dot product, fp16)",
}


def _load(path: Path) -> dict:
    return json.loads((path / "result.json").read_text())


def _run_summary(run: dict) -> dict:
    if "error" in run:
        return {"error": run["error"]}
    return {k: run.get(k) for k in ("precision", "execution_precision", "correct", "total", "seconds", "s_per_scene",
                                    "cpu_s_per_scene")}


def _profile(arm_dir: Path, x86: dict) -> dict:
    if not (arm_dir / "result.json").exists():
        wall = _wall(arm_dir)
        return {"ok": False, "error": f"no result (the emulated run crashed; exit {wall.get('exit_code')})", **wall}
    arm = _load(arm_dir)
    runs = {}
    for key, comp in arm["comparisons"].items():
        run = arm["runs"].get(key, {})
        entry = {"gating": comp["gating"], "ok": comp["ok"], **_run_summary(run)}
        if "error" in comp:
            entry["error"] = comp["error"]
        else:
            entry.update(answers_identical=comp["matches"], answers_compared=comp["total"],
                         mismatches=comp["mismatches"], numeric=comp.get("numeric"))
            x86_run = x86["runs"].get(key, {})
            if x86_run.get("cpu_s_per_scene") and run.get("cpu_s_per_scene"):
                entry["slowdown_vs_x86"] = round(run["cpu_s_per_scene"] / x86_run["cpu_s_per_scene"], 1)
        runs[key] = entry
    pre = arm["preprocess"]
    return {"profile": arm["profile"], "qemu_cpu": arm["qemu_cpu"], "ok": arm["ok"],
            "environment": arm["environment"], "torch_importable": arm["torch_importable"],
            "scenes": len(next(iter(arm["runs"].values()), {}).get("answers", [])),
            "preprocess": {"ok": all(c["ok"] for c in pre), "cases": pre},
            "render_parity": arm["render_parity"], "runs": runs, "check_seconds": arm["seconds"], **_wall(arm_dir)}


def _wall(arm_dir: Path) -> dict:
    f = arm_dir.parent / f"{arm_dir.name}.run.json"
    return json.loads(f.read_text()) if f.exists() else {}


def build_report(x86_dir: Path, arm_dirs: list[Path], meta: dict) -> dict:
    x86 = _load(x86_dir)
    profiles = {}
    for d in arm_dirs:
        name = d.name.removeprefix("arm64-")
        profiles[name] = _profile(d, x86)
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "meta": meta,
            "scenes": len(x86["inputs"]["questions"]), "questions_per_scene": 5,
            "x86": {"environment": x86["environment"], "runs": {k: _run_summary(r) for k, r in x86["runs"].items()}},
            "profiles": profiles, "ok": bool(profiles) and all(p["ok"] for p in profiles.values())}


def _fmt_run(entry: dict) -> str:
    if "error" in entry:
        return f"error: {entry['error'][:80]}"
    return f"{entry['answers_identical']}/{entry['answers_compared']}"


def verified_on(report: dict) -> list[str]:
    x86 = report["x86"]
    env = x86["environment"]
    ort_runs = [k for k in x86["runs"] if k.endswith("/onnxruntime")]
    lines = ["| Platform | Backends | Precisions | How verified |", "|---|---|---|---|",
             f"| x86-64 CPU natively ({env['cpu'].get('model', '?')}) | ONNX Runtime {env['onnxruntime']}, "
             f"OpenVINO {env['openvino']} | {', '.join(k.split('/')[0] for k in ort_runs)} | test suite; "
             f"reference answers for {report['scenes']} held-out scenes |"]
    for name, p in report["profiles"].items():
        if "runs" not in p:
            lines.append(f"| aarch64 under emulation, {name} | - | - | FAILED: {p.get('error')} |")
            continue
        ort = {k: v for k, v in p["runs"].items() if v["gating"]}
        ov = {k: v for k, v in p["runs"].items() if not v["gating"]}
        ort_text = ", ".join(f"{k.split('/')[0]} {_fmt_run(v)}" for k, v in ort.items())
        ov_text = ", ".join(f"{k.split('/')[0]} {_fmt_run(v)}" for k, v in ov.items())
        e = p["environment"]
        lines.append(
            f"| aarch64 under qemu-user (`{p['qemu_cpu']}`; {PROFILE_NAMES.get(name, name).split(':')[0]}) | "
            f"ONNX Runtime {e['onnxruntime']}, OpenVINO {e['openvino']} (f32) | "
            f"{', '.join(sorted({k.split('/')[0] for k in p['runs']}))} | "
            f"{'passed' if p['ok'] else 'FAILED'}: ORT answers identical to x86: {ort_text}; "
            f"OpenVINO (reported): {ov_text or 'not run'}; preprocessing within +-1 "
            f"{'ok' if p['preprocess']['ok'] else 'FAILED'} |")
    lines.append("| NVIDIA GPU / Jetson with TensorRT | TensorRT | - | not verified here (no GPU on this machine) |")
    return lines


def summary_markdown(report: dict) -> str:
    m = report["meta"]
    profile_times = ", ".join(f"{n} {p.get('wall_s', '?')} s" for n, p in report["profiles"].items())
    out = [f"# ARM64 under emulation: {'PASSED' if report['ok'] else 'FAILED'}", "",
           f"Created {report['created']} by `tools/arm64_check.sh` ({m.get('qemu', 'qemu ?')}, "
           f"{m.get('suite', '')} arm64 rootfs; rootfs cached: {m.get('rootfs_cached', '?')}, venv cached: "
           f"{m.get('venv_cached', '?')}). {report['scenes']} held-out scenes x 5 questions, greedy decoding, "
           f"answers compared token for token with the same script run natively on x86.", "",
           f"Time: total {m.get('total_s', '?')} s wall ({m.get('total_cpu_s', '?')} CPU s) = x86 reference {m.get('x86_s', '?')} s + rootfs/venv/install "
           f"{m.get('setup_s', '?')} s + emulated runs "
           f"({profile_times}).", "",
           "## Verified on", "", *verified_on(report), "",
           "## Runs", "", "| profile | run | identical to x86 | correct | s/scene (wall) | CPU s/scene | CPU vs x86 | execution precision | "
           "embeds max diff | logits max diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in report["x86"]["runs"].items():
        out.append(f"| x86 native | {key} | reference | {r.get('correct')}/{r.get('total')} | {r.get('s_per_scene')} "
                   f"| {r.get('cpu_s_per_scene')} | 1 | {r.get('execution_precision')} | | |")
    for name, p in report["profiles"].items():
        for key, r in p.get("runs", {}).items():
            if "error" in r:
                out.append(f"| {name} | {key} | error: {r['error'][:100]} | | | | | | | |")
                continue
            num = r.get("numeric") or {}
            fmt = lambda n: ("bitwise equal" if num[n]["bitwise_equal"] else f"{num[n]['max_abs_diff']:.2e}") if n in num else ""
            out.append(f"| {name} | {key}{'' if r['gating'] else ' (reported only)'} | {_fmt_run(r)} | "
                       f"{r['correct']}/{r['total']} | {r['s_per_scene']} | {r.get('cpu_s_per_scene')} | "
                       f"{r.get('slowdown_vs_x86', '')}x | "
                       f"{r['execution_precision']} | {fmt('embeds')} | {fmt('logits')} |")
    out += ["", "## Profiles", ""]
    for name, p in report["profiles"].items():
        out.append(f"### {name}: {PROFILE_NAMES.get(name, name)}")
        if "environment" not in p:
            out += ["", f"FAILED: {p.get('error')}", ""]
            continue
        e = p["environment"]
        out += ["", f"- QEMU_CPU={p['qemu_cpu']}; features: {' '.join(e['cpu'].get('hwcaps', []))}",
                f"- Python {e['python']}, numpy {e['numpy']}, ONNX Runtime {e['onnxruntime']}, OpenVINO "
                f"{e['openvino']}, Pillow {e['pillow']}, OpenCV {e['opencv']}, tokenizers {e['tokenizers']}; "
                f"torch importable: {p['torch_importable']}",
                f"- wall time {p.get('wall_s', '?')} s (check itself {p['check_seconds']} s)",
                f"- scene rendering on arm64: {p['render_parity']['scenes_differing']}/{p['render_parity']['scenes']} "
                f"scenes differ from x86 (max {p['render_parity']['max_uint8_diff']} grey levels; answers use the "
                f"x86 images)", "", "| preprocessing case | max uint8 diff | pixels differing | ok |", "|---|---|---|---|"]
        for c in p["preprocess"]["cases"]:
            out.append(f"| {c['case']} | {c.get('max_uint8_diff')} | {c.get('frac_pixels_differing')} | "
                       f"{'yes' if c['ok'] else 'NO: ' + c.get('reason', '')} |")
        for key, r in p["runs"].items():
            for mm in r.get("mismatches", [])[:10]:
                d = mm.get("divergence", {})
                out.append(f"\n- {key} scene {mm['scene']} ({mm['task']}): x86 {mm['x86']!r}, arm64 {mm['arm64']!r}; "
                           f"first differing token at step {d.get('step')}, logit gap {d.get('logit_gap')} ({d.get('note')})")
        out.append("")
    return "\n".join(out) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(x86_dir: Path, arm_dirs: list[Path], out: Path, meta: dict) -> int:
    report = build_report(x86_dir, arm_dirs, meta)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "report.json", json.dumps(report, indent=1) + "\n")
    _atomic_write(out / "summary.md", summary_markdown(report))
    print(f"arm64_report: wrote {out / 'report.json'} and {out / 'summary.md'}")
    return 0 if report["ok"] else 1
