"""The end-to-end check behind tools/arm64_check.sh: the same script natively on x86 and under
emulation on aarch64, runtime only (numpy, a backend, tokenizers, Pillow; never torch).

    python tools/arm64_check.py reference --bundle fp32=DIR [--bundle int8=DIR] --scenes N --out X86_DIR
    python tools/arm64_check.py check --reference X86_DIR --out ARM_DIR --profile a57
    python tools/arm64_check.py report --x86 X86_DIR --arm ARM_DIR [--arm ...] --out RESULTS_DIR
    python3 tools/arm64_check.py hwcaps      # aarch64 feature names (Linux cpuinfo spelling)

``reference`` renders held-out scenes, asks all five tasks on each, answers them with every
bundle on every backend, and saves images, questions, answers, tokens, a few image embeddings
and first-step logits, and the preprocessing cases. ``check`` answers the SAME saved images and
questions with the same bundles, compares, and exits 1 when an ONNX Runtime answer or a
preprocessed pixel differs beyond the measured tolerance (OpenVINO answers are reported, not
gated: on ARM OpenVINO only simulates INT8, so ARM deployments use ONNX Runtime).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NUMERIC_SCENES = 4          # scenes whose image embeddings and first-step logits are compared
MAX_DIVERGENCES = 20        # mismatched answers traced back to their first differing token
GATING_BACKENDS = ("onnxruntime",)

# Linux arch/arm64/include/uapi/asm/hwcap.h: bit -> the name /proc/cpuinfo prints
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
         "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
          "svebf16 i8mm bf16 dgh rng bti mte").split()


def hwcaps() -> list[str]:
    """Features the (emulated) CPU reports through AT_HWCAP/AT_HWCAP2; [] off aarch64."""
    if platform.machine() != "aarch64":
        return []
    import ctypes

    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    return decode_hwcaps(getauxval(16), getauxval(26))  # AT_HWCAP, AT_HWCAP2


def decode_hwcaps(bits: int, bits2: int) -> list[str]:
    return [n for i, n in enumerate(HWCAP) if bits >> i & 1] + [n for i, n in enumerate(HWCAP2) if bits2 >> i & 1]


def environment(threads: int | None) -> dict:
    import numpy

    env = {"machine": platform.machine(), "python": platform.python_version(), "numpy": numpy.__version__,
           "qemu_cpu": os.environ.get("QEMU_CPU"), "threads": threads, "cpu": _cpu_description()}
    for module, key in (("onnxruntime", "onnxruntime"), ("openvino", "openvino"), ("PIL", "pillow"),
                        ("cv2", "opencv"), ("tokenizers", "tokenizers")):
        try:
            mod = __import__(module)
            env[key] = mod.get_version() if key == "openvino" else mod.__version__
        except ImportError as e:
            env[key] = f"not installed ({e})"
    return env


def _cpu_description() -> dict:
    if platform.machine() == "aarch64":
        return {"hwcaps": hwcaps()}
    flags, model = [], ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1].split()
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    keep = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")]
    return {"model": model, "flags": keep}


# -- inputs ---------------------------------------------------------------------------------------
def build_inputs(n: int, seed: int) -> dict:
    import numpy as np

    from edgevl.data.tasks import scene_qas
    from edgevl.data.world import SceneSet

    scenes = SceneSet("test", n, seed)
    qas = [scene_qas(s) for s in scenes]
    return {"images": np.stack([s.image() for s in scenes]), "scene_index": [s.index for s in scenes],
            "tasks": [[qa.task for qa in q] for q in qas], "questions": [[qa.question for qa in q] for q in qas],
            "expected": [[qa.answer for qa in q] for q in qas], "seed": seed}


def render_parity(inputs: dict) -> dict:
    """Do the scenes render to the same pixels here? (numpy's sin/cos differ by ulps across CPUs)"""
    import numpy as np

    mine = build_inputs(len(inputs["scene_index"]), inputs["seed"])["images"]
    diff = np.abs(mine.astype(np.int32) - inputs["images"].astype(np.int32)).reshape(len(mine), -1).max(1)
    return {"scenes": len(mine), "scenes_differing": int((diff > 0).sum()), "max_uint8_diff": int(diff.max(initial=0)),
            "note": "answers are compared on the x86-rendered images either way"}


# -- answering ------------------------------------------------------------------------------------
def _manifest_sha(bundle_dir: Path) -> str:
    from edgevl.bundle import sha256_file

    return sha256_file(bundle_dir / "manifest.json")


def answer_run(bundle_dir: Path, backend: str, inputs: dict, threads: int | None) -> tuple[dict, dict]:
    """All questions on one bundle and backend -> (JSON-able result, numeric arrays)."""
    import numpy as np

    import edgevl
    from edgevl.evaluate import normalise

    vlm = edgevl.load(bundle_dir, backend=backend, threads=threads, verbose=False)
    try:
        precisions = sorted({_precision_name(r.execution_precision) for r in vlm.engine.runners.values()
                             if hasattr(r, "execution_precision")})
        answers, tokens, per_scene = [], [], []
        cpu0 = _cpu_seconds()
        for image, questions in zip(inputs["images"], inputs["questions"]):
            t = time.perf_counter()
            results = [vlm.generate(image, q, channels="rgb") for q in questions]
            per_scene.append(time.perf_counter() - t)
            answers.append([r.text for r in results])
            tokens.append([r.tokens for r in results])
        cpu_used = _cpu_seconds() - cpu0
        k = min(NUMERIC_SCENES, len(inputs["images"]))
        embeds = vlm.encode_images(list(inputs["images"][:k]), channels="rgb")
        logits = np.stack([_first_logits(vlm.engine, embeds[i:i + 1], inputs["questions"][i][0]) for i in range(k)])
    finally:
        vlm.close()
    correct = sum(normalise(a) == normalise(e) for sa, se in zip(answers, inputs["expected"]) for a, e in zip(sa, se))
    result = {"bundle_manifest_sha256": _manifest_sha(bundle_dir), "backend": backend,
              "precision": vlm.bundle.precision, "execution_precision": precisions or None,
              "answers": answers, "tokens": tokens, "correct": correct,
              "total": sum(len(q) for q in inputs["questions"]), "seconds": round(sum(per_scene), 3),
              "s_per_scene": round(float(np.median(per_scene)), 4) if per_scene else None,
              # CPU seconds (all threads) per scene: steadier than wall time on a shared machine
              "cpu_s_per_scene": round(cpu_used / max(1, len(per_scene)), 4)}
    return result, {"embeds": embeds, "logits": logits}


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _precision_name(value) -> str:
    """OpenVINO hands back an element type ("<Type: 'float32'>" as a string); keep the name."""
    text = str(value)
    return text.split("'")[1] if text.count("'") == 2 else text


def _first_logits(engine, image_embeds, question: str):
    ids = engine.encode_prompt(question)
    cache = engine.new_cache(slots=1, capacity=len(ids) + 1)
    return engine.prefill(cache, 0, engine.merge(ids, image_embeds))


def divergence(bundle_dir: Path, backend: str, image, question: str, x86_tokens: list[int], threads) -> dict:
    """Replay the x86 tokens here; where does this CPU's argmax first differ, and by how much?"""
    import numpy as np

    import edgevl

    vlm = edgevl.load(bundle_dir, backend=backend, threads=threads, verbose=False)
    try:
        engine = vlm.engine
        ids = engine.encode_prompt(question)
        embeds = vlm.encode_images([image], channels="rgb")
        cache = engine.new_cache(slots=1, capacity=len(ids) + len(x86_tokens) + 2)
        logits = engine.prefill(cache, 0, engine.merge(ids, embeds))
        for step, token in enumerate(x86_tokens + [None]):
            mine = int(np.argmax(logits))
            if token is None or mine != token:
                ref = float(logits[token]) if token is not None else None
                return {"step": step, "x86_token": token, "arm_token": mine,
                        "logit_gap": None if ref is None else float(logits[mine]) - ref,
                        "note": "x86 stopped here" if token is None else "argmax differs"}
            logits = engine.decode(cache, 1, np.asarray([token], dtype=np.int64))[0]
    finally:
        vlm.close()
    return {"step": None, "note": "no divergence when replaying x86 tokens (difference comes from stop handling)"}


def run_all(bundles: dict, backends: list[str], inputs: dict, threads) -> tuple[dict, dict]:
    runs, arrays = {}, {}
    for name, path in bundles.items():
        for backend in backends:
            key = f"{name}/{backend}"
            print(f"arm64_check: answering {len(inputs['questions'])} scenes with {key}", flush=True)
            try:
                runs[key], numeric = answer_run(Path(path), backend, inputs, threads)
            except Exception as e:  # recorded and reported (and gating for ONNX Runtime), never dropped
                runs[key] = {"backend": backend, "error": f"{type(e).__name__}: {e}"}
                print(f"arm64_check: {key} failed: {runs[key]['error']}", flush=True)
                continue
            arrays.update({f"{key}:{k}": v for k, v in numeric.items()})
            r = runs[key]
            print(f"arm64_check: {key}: {r['correct']}/{r['total']} correct, {r['s_per_scene']} s/scene "
                  f"(execution precision {r['execution_precision']})", flush=True)
    return runs, arrays


# -- modes ----------------------------------------------------------------------------------------
def cmd_reference(args) -> int:
    import numpy as np

    import arm64_parity as parity
    from edgevl.bundle import load_bundle

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundles = dict(b.split("=", 1) for b in args.bundle)
    inputs = build_inputs(args.scenes, args.seed)
    spec = load_bundle(next(iter(bundles.values()))).manifest["preprocess"]
    cases = parity.make_cases(inputs["images"][0], spec)
    with tempfile.TemporaryDirectory() as tmp:
        pre = [parity.run_case(c, tmp, i) for i, c in enumerate(cases)]
    parity.save_cases(cases, pre, out / "preprocess.npz")
    runs, arrays = run_all(bundles, args.backends.split(","), inputs, args.threads)
    np.savez_compressed(out / "inputs.npz", images=inputs["images"])
    np.savez_compressed(out / "numeric.npz", **arrays)
    meta = {k: v for k, v in inputs.items() if k != "images"}
    doc = {"side": "x86", "environment": environment(args.threads), "inputs": meta,
           "bundles": {n: Path(p).name for n, p in bundles.items()}, "backends": args.backends.split(","),
           "preprocess_cases": parity.case_metadata(cases), "runs": runs}
    (out / "result.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all("error" not in r for r in runs.values()) else 1


def compare_runs(x86: dict, mine: dict, inputs: dict) -> dict:
    """Answer-by-answer comparison of one run; mismatches listed with the question and expectation."""
    if "error" in mine or "error" in x86:
        return {"ok": False, "error": mine.get("error") or f"x86 run failed: {x86.get('error')}"}
    mismatches, matches, total = [], 0, 0
    for s, (xa, ma) in enumerate(zip(x86["answers"], mine["answers"])):
        for q, (a, b) in enumerate(zip(xa, ma)):
            total += 1
            if a == b and x86["tokens"][s][q] == mine["tokens"][s][q]:
                matches += 1
            else:
                mismatches.append({"scene": inputs["scene_index"][s], "scene_pos": s, "q": q,
                                   "task": inputs["tasks"][s][q], "question": inputs["questions"][s][q],
                                   "expected": inputs["expected"][s][q], "x86": a, "arm64": b})
    same_bundle = x86["bundle_manifest_sha256"] == mine["bundle_manifest_sha256"]
    return {"ok": not mismatches and same_bundle, "matches": matches, "total": total, "mismatches": mismatches,
            "same_bundle": same_bundle}


def cmd_check(args) -> int:
    import numpy as np

    import arm64_parity as parity

    ref = Path(args.reference)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x86 = json.loads((ref / "result.json").read_text())
    t_start = time.perf_counter()
    # recorded: the emulated venv has no torch at all, so any torch import would fail there
    torch_present = importlib.util.find_spec("torch") is not None
    inputs = dict(x86["inputs"], images=np.load(ref / "inputs.npz")["images"])
    if args.scenes:
        inputs = {k: v[:args.scenes] if isinstance(v, (list, np.ndarray)) else v for k, v in inputs.items()}
    # 1. preprocessing parity: the same cases, from the same saved inputs
    cases, x86_pre = parity.load_cases(x86["preprocess_cases"], np.load(ref / "preprocess.npz"))
    pre_checks = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (case, (xr, xp)) in enumerate(zip(cases, x86_pre)):
            resized, pixels = parity.run_case(case, tmp, i)
            pre_checks.append(parity.compare_case(case, xr, resized, xp, pixels))
    for c in pre_checks:
        print(f"arm64_check: preprocess {'ok  ' if c['ok'] else 'FAIL'} {c['case']}: max diff "
              f"{c.get('max_uint8_diff')}, {c.get('frac_pixels_differing')} of pixels differ", flush=True)
    # 2. the same questions on the same bundles and backends
    bundle_root = Path(args.bundle_root) if args.bundle_root else ref.parent / "bundles"
    bundles = {n: str(bundle_root / d) for n, d in x86["bundles"].items()}
    runs, arrays = run_all(bundles, x86["backends"], inputs, args.threads)
    x86_numeric = np.load(ref / "numeric.npz")
    comparisons = {}
    for key, mine in runs.items():
        x86_run = x86["runs"].get(key, {"error": "no x86 run"})
        if "answers" in x86_run:
            x86_run = dict(x86_run, answers=x86_run["answers"][:len(inputs["questions"])],
                           tokens=x86_run["tokens"][:len(inputs["questions"])])
        comp = compare_runs(x86_run, mine, inputs)
        comp["gating"] = mine.get("backend") in GATING_BACKENDS
        if f"{key}:embeds" in arrays and f"{key}:embeds" in x86_numeric.files:
            comp["numeric"] = {n: {"max_abs_diff": float(np.abs(arrays[f"{key}:{n}"] - x86_numeric[f"{key}:{n}"]).max()),
                                   "bitwise_equal": bool(np.array_equal(arrays[f"{key}:{n}"], x86_numeric[f"{key}:{n}"]))}
                               for n in ("embeds", "logits")}
        for m in comp.get("mismatches", [])[:MAX_DIVERGENCES]:
            m["divergence"] = divergence(Path(bundles[key.split("/")[0]]), mine["backend"],
                                         inputs["images"][m["scene_pos"]], m["question"],
                                         x86_run["tokens"][m["scene_pos"]][m["q"]], args.threads)
        comparisons[key] = comp
        print(f"arm64_check: {key}: {comp.get('matches')}/{comp.get('total')} answers identical to x86"
              + (f" ({comp['error']})" if "error" in comp else "") + ("" if comp["gating"] else " [reported only]"),
              flush=True)
    torch_imported = "torch" in sys.modules   # the runtime must never pull torch in
    ok = (all(c["ok"] for c in pre_checks) and not torch_imported
          and all(c["ok"] for c in comparisons.values() if c["gating"]))
    doc = {"side": "arm64", "profile": args.profile, "qemu_cpu": args.qemu_cpu or os.environ.get("QEMU_CPU"),
           "environment": environment(args.threads), "torch_importable": torch_present, "torch_imported": torch_imported,
           "render_parity": render_parity(inputs), "preprocess": pre_checks, "runs": runs,
           "comparisons": comparisons, "ok": ok, "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "result.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"arm64_check: profile {args.profile}: {'PASSED' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("reference", help="x86: answers, tokens, pixels to compare against")
    r.add_argument("--bundle", action="append", required=True, help="NAME=DIR (repeat: fp32=..., int8=...)")
    r.add_argument("--scenes", type=int, default=50)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--backends", default="onnxruntime,openvino")
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--out", required=True)
    c = sub.add_parser("check", help="aarch64: the same questions, compared with the reference")
    c.add_argument("--reference", required=True)
    c.add_argument("--bundle-root", default=None, help="where the bundles are (default: REFERENCE/../bundles)")
    c.add_argument("--out", required=True)
    c.add_argument("--profile", default="native")
    c.add_argument("--qemu-cpu", default=None)
    c.add_argument("--scenes", type=int, default=None, help="only the first N reference scenes")
    c.add_argument("--threads", type=int, default=None)
    rp = sub.add_parser("report", help="JSON report + Markdown summary from the x86 and arm64 results")
    rp.add_argument("--x86", required=True)
    rp.add_argument("--arm", action="append", default=[])
    rp.add_argument("--out", required=True)
    rp.add_argument("--meta", action="append", default=[], help="KEY=VALUE recorded in the report")
    sub.add_parser("hwcaps", help="print the aarch64 features this CPU reports")
    args = p.parse_args(argv)
    if args.mode == "hwcaps":
        print(" ".join(hwcaps()))
        return 0
    if args.mode == "report":
        from arm64_report import write_report

        return write_report(Path(args.x86), [Path(a) for a in args.arm], Path(args.out),
                            dict(m.split("=", 1) for m in args.meta))
    return {"reference": cmd_reference, "check": cmd_check}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
