"""Peak resident memory of a whole answer loop, one bundle per fresh process.

    python -m edgevl.benchmarks.runtime_memory BUNDLE [BUNDLE ...] --answers 7 --md-out results.md

Each bundle is loaded the way `edgevl bench` loads it (ONNX Runtime, 2 threads) in a process of its
own, then answers one 512x512 image ``--answers`` times (32 new tokens). Reported: VmRSS and VmHWM
(peak) after loading and after the answers. Memory does not depend on CPU load, so unlike the
speed benchmarks this one stays valid on a busy machine; the machine is recorded all the same.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = round(int(line.split()[1]) / 1024.0, 1)
    return out


def measure(bundle: str, precision: str, answers: int) -> dict:
    """In this process: load ``bundle``, answer ``answers`` times -> memory at each point."""
    import numpy as np

    from edgevl.benchmarks.subject_edgevl import EdgeVLSubject

    subject = EdgeVLSubject(bundle, "onnxruntime", precision, 2)
    subject._load()
    loaded = _status()
    image = np.random.RandomState(0).randint(0, 255, (512, 512, 3), np.uint8)
    for _ in range(answers):
        subject.generate([image], "describe the image.", 32)
    return {"bundle": bundle, "precision": precision, "answers": answers, "after_load": loaded, "after_answers": _status()}


def render(result: dict) -> str:
    m = result["machine"]
    lines = [f"edgevl {result['edgevl']} runtime, ONNX Runtime, 2 threads; each bundle in a process of its own, "
             f"{result['rows'][0]['answers']} answers of 32 tokens to one 512x512 image. Machine: {m['cpu']}, "
             f"{m['cores']} cores, flags {' '.join(m['flags'])}, {m['memory_gb']} GB.", "",
             "| bundle | precision | RSS after load MB | peak after load MB | peak after answers MB |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {Path(r['bundle']).name} | {r['precision']} | {r['after_load']['VmRSS']:.0f} | "
              f"{r['after_load']['VmHWM']:.0f} | {r['after_answers']['VmHWM']:.0f} |" for r in result["rows"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="*")
    p.add_argument("--answers", type=int, default=7)
    p.add_argument("--json-out", type=Path)
    p.add_argument("--md-out", type=Path)
    p.add_argument("--one", nargs=2, metavar=("BUNDLE", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, args.answers)))
        return {}
    from edgevl.benchmarks.batching import atomic_write
    from edgevl.benchmarks.machine import machine_info
    from edgevl.bundle import load_bundle

    rows = []
    for bundle in args.bundles:
        precision = load_bundle(bundle).precision
        run = subprocess.run([sys.executable, "-m", "edgevl.benchmarks.runtime_memory", "--one", bundle, precision,
                              "--answers", str(args.answers)], check=True, capture_output=True, text=True)
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    from edgevl import __version__

    result = {"benchmark": "runtime_memory", "edgevl": __version__, "rows": rows, "machine": machine_info()}
    text = render(result)
    print(text)
    if args.json_out:
        atomic_write(args.json_out, json.dumps(result, indent=2) + "\n")
    if args.md_out:
        atomic_write(args.md_out, text + "\n")
    return result


if __name__ == "__main__":
    main()
