"""The quantization accuracy table: FP32 / PTQ minmax / entropy / percentile / QAT (and the
OpenVINO NNCF IR of `edgevl build --target openvino`), exact match on held-out test scenes, on
ONNX Runtime and OpenVINO, in one table.

    nice -n 19 python benchmarks/quant_accuracy.py --n 1000 --qat-steps 300 \
        --work /tmp/quant-acc --json-out benchmarks/results/quant_accuracy.json \
        --md-out benchmarks/results/quant_accuracy.md

Every quantized bundle is built with the default recipe (budget on 200 *validation* scenes,
sensitivity pass on) but with --accept-loss, so a method that breaks the budget still gets its
row; the table is measured on the *test* split, which no recipe decision ever saw. A quick check
of the script: ``--n 5 --samples 8 --qat-steps 2 --eval-scenes 3``.

``--variants fp32,int8,int4`` measures the composite `edgevl build --precision int8 / int4`
deployments instead (one build per backend, each evaluated on its own backend: the recipe it
holds was chosen by timing on that backend). ``--kv-cache int8`` makes their ONNX Runtime builds
keep the lowered decoder's int8 KV cache whatever the timing says (rows ``int8+kv8@onnxruntime``),
so the table shows what that cache costs in accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

METHODS = ("minmax", "entropy", "percentile")


def build_variants(args, log) -> dict[str, Path]:
    from edgevl.exporters.export import export_model
    from edgevl.exporters.quantize.openvino_int8 import add_openvino_int8
    from edgevl.exporters.quantize.ptq import quantize_bundle
    from edgevl.exporters.quantize.qat import qat_bundle
    from edgevl.exporters.quantize.recipes import PTQRecipe, QATRecipe
    from edgevl.runtimes.registry import is_installed

    work = Path(args.work)
    variants = {"fp32": export_model(args.model, work / "fp32", force=True, log=log).path}
    wanted = set(args.variants.split(",")) if args.variants else None
    if wanted is not None:
        from edgevl.exporters.build import build_bundle
        from edgevl.runtimes.registry import installed_backends

        kv8 = args.kv_cache == "int8"
        for precision in [p for p in ("int8", "int4") if p in wanted]:
            for target in [b for b in ("onnxruntime", "openvino") if b in installed_backends()]:
                if kv8 and target != "onnxruntime":
                    continue            # the int8 KV cache is the ONNX Runtime-lowered decoder's
                name = f"{precision}{'+kv8' if kv8 else ''}@{target}"
                variants[name] = build_bundle(
                    args.model, target, precision, work / name.replace("@", "-"), calib=args.calib, force=True,
                    eval_scenes=args.eval_scenes, accept_loss=True, log=log, progress=False,
                    kv_cache=args.kv_cache).path
        return variants
    for method in METHODS:
        recipe = PTQRecipe(method=method, samples=args.samples, accept_loss=True, eval_scenes=args.eval_scenes)
        variants[f"ptq-{method}"] = quantize_bundle(variants["fp32"], args.calib, work / f"ptq-{method}", recipe,
                                                    force=True, log=log, progress=False).path
    if is_installed("openvino"):
        recipe = PTQRecipe(method="percentile", samples=args.samples, accept_loss=True, eval_scenes=args.eval_scenes)
        variants["ptq-nncf-openvino-ir"] = quantize_bundle(variants["fp32"], args.calib, work / "ptq-nncf-ov", recipe,
                                                           force=True, log=log, progress=False,
                                                           after_qdq=add_openvino_int8).path
    if args.qat_steps > 0:
        recipe = QATRecipe(steps=args.qat_steps, eval_scenes=args.eval_scenes)
        variants["qat"] = qat_bundle(args.model, work / "qat", recipe, force=True, log=log).path
    return variants


def measure(variants: dict[str, Path], backends, n: int, log) -> dict:
    from edgevl.bundle import load_bundle
    from edgevl.exporters.quantize.report import evaluate_bundle

    rows = {}
    for name, path in variants.items():
        bundle = load_bundle(path)
        for backend in backends:
            if name == "ptq-nncf-openvino-ir" and backend != "openvino":
                continue              # its ONNX is the percentile Q/DQ row; the IR is OpenVINO's
            if "@" in name and name.partition("@")[2] != backend:
                continue              # a composite build holds what was fastest on its own backend
            t = time.perf_counter()
            r = evaluate_bundle(bundle, backend, n, "test")
            rows.setdefault(name, {})[backend] = {"accuracy": r["accuracy"], "by_task": r["by_task"],
                                                 "seconds": round(time.perf_counter() - t, 1)}
            log(f"  {name:<22} {backend:<12} {100 * r['accuracy']:.2f}%")
    return rows


def table(rows: dict, backends, n: int) -> str:
    head = "| variant | " + " | ".join(f"{b} accuracy | {b} vs FP32" for b in backends) + " |"
    lines = [f"Exact match on {n} held-out test scenes ({5 * n} questions).", "", head,
             "|" + "---|" * (1 + 2 * len(backends))]
    for name, per_backend in rows.items():
        cells = []
        for b in backends:
            r = per_backend.get(b)
            if r is None:
                cells += ["", ""]
                continue
            base = rows["fp32"][b]["accuracy"]
            cells += [f"{100 * r['accuracy']:.2f}%", "" if name == "fp32" else f"{100 * (r['accuracy'] - base):+.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="edgevl-tiny")
    parser.add_argument("--n", type=int, default=1000, help="held-out test scenes (default 1000)")
    parser.add_argument("--calib", default="world", help="calibration source (default: the synthetic world)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--eval-scenes", type=int, default=200, help="validation scenes of each recipe's budget")
    parser.add_argument("--qat-steps", type=int, default=300, help="0 skips QAT")
    parser.add_argument("--variants", default=None,
                        help="fp32,int8,int4: the composite deployments instead of the PTQ/QAT recipes")
    parser.add_argument("--kv-cache", choices=("auto", "int8", "float32"), default="auto",
                        help="composite builds: the ONNX Runtime-lowered decoder's KV cache (default: by timing)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgevl-quant-accuracy"))
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--md-out", type=Path)
    args = parser.parse_args(argv)

    from edgevl.benchmarks.machine import machine_info
    from edgevl.runtimes.registry import installed_backends

    def log(*a):
        print(*a, file=sys.stderr)

    backends = [b for b in ("onnxruntime", "openvino") if b in installed_backends()]
    t0 = time.perf_counter()
    variants = build_variants(args, log)
    rows = measure(variants, backends, args.n, log)
    result = {"n": args.n, "split": "test", "backends": backends, "rows": rows,
              "settings": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(),
              "seconds": round(time.perf_counter() - t0, 1)}
    text = table(rows, backends, args.n)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if args.md_out:
        args.md_out.parent.mkdir(parents=True, exist_ok=True)
        args.md_out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
