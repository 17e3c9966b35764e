"""Scale check: export an edge-sized SmolVLM-256M-shaped random-weight checkpoint; print the
export's wall time and peak memory as JSON (issue 3's "Scale" point, quoted in the README).

    nice -n 19 python benchmarks/smolvlm_256m_shaped.py --cache ~/.cache/edgevl-bench \
        [--out DIR] [--json-out benchmarks/results/export_smolvlm_256m_shaped.json]

The checkpoint (benchmarks/smolvlm_shaped.py: SigLIP-B/16-like encoder at 512 px, pixel
shuffle 4 -> 64 image tokens, SmolLM2-135M-shaped Llama decoder, vocab 49280) is built once
under ``--cache`` in a separate process, so the peak memory reported is the export's alone:
load, three ONNX parts, parity of every part in ONNX Runtime, 3 x 16 greedy tokens through
the bundle vs transformers' ``generate``, and the atomic bundle write.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def ensure_checkpoint(cache: Path) -> tuple[Path, float | None]:
    """The cached checkpoint, built in a child process when missing -> (path, build seconds)."""
    from edgevl.benchmarks.smolvlm_shaped import BUILD_VERSION, NAME

    path = cache / "checkpoints" / f"{NAME}-v{BUILD_VERSION}"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path, None
    t = time.perf_counter()
    code = ("import sys; from edgevl.benchmarks.smolvlm_shaped import smolvlm_256m_shaped_checkpoint as build; "
            "build(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(cache / "checkpoints")], check=True, stdout=sys.stderr)
    return path, round(time.perf_counter() - t, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgevl-bench",
                        help="where the random-weight checkpoint is built once and reused")
    parser.add_argument("--out", type=Path, help="bundle directory (default: CACHE/bundles/smolvlm-256m-shaped)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON result here")
    parser.add_argument("--checkpoint", type=Path, help="export this checkpoint directory instead (a quick check "
                        "of the script on a tiny one)")
    args = parser.parse_args(argv)

    from edgevl.benchmarks.machine import machine_info
    from edgevl.benchmarks.shaped import emit, parity_facts

    ckpt, build_s = (args.checkpoint, None) if args.checkpoint else ensure_checkpoint(args.cache)
    out = args.out or args.cache / "bundles" / "smolvlm-256m-shaped"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    from edgevl.exporters.export import export_model   # torch + transformers imports count: a user pays them

    bundle = export_model(ckpt, out, force=True, log=lambda *a: print(*a, file=sys.stderr))
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_mb = usage.ru_maxrss / 1024.0
    parity = bundle.report("parity") or {}
    files = bundle.manifest["files"]
    result = {
        "benchmark": "export smolvlm-256m-shaped (fp32)",
        "checkpoint": str(ckpt), "checkpoint_build_seconds": build_s, "bundle": str(bundle.path),
        "export_seconds": round(seconds, 1),
        "export_seconds_after_imports": parity.get("export_seconds"),
        "export_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),   # what a loaded machine does not inflate
        "part_export_seconds": parity.get("part_seconds"),
        "peak_rss_mb": round(peak_mb, 1),
        "bundle_mb": round(sum(f["bytes"] for f in files.values()) / 1e6, 1),
        "onnx_mb": {rel: round(f["bytes"] / 1e6, 1) for rel, f in files.items() if rel.endswith((".onnx", ".data"))},
        **parity_facts(parity),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_info(),
    }
    return emit(result, args.json_out)


if __name__ == "__main__":
    main()
