"""`make demo`: the whole flow on the embedded edgevl-tiny, start to end, in a few minutes.

1. export edgevl-tiny to an FP32 bundle, checked against PyTorch
2. answer a few held-out scenes with the on-device runtime on every installed CPU backend
3. accuracy of the bundle on held-out scenes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes for the accuracy summary")
    args = parser.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()

    import edgevl
    from edgevl.data.tasks import scene_qas
    from edgevl.data.world import make_scene
    from edgevl.evaluate import evaluate
    from edgevl.exporters.export import export_model
    from edgevl.runtimes.registry import installed_backends

    step("1. export edgevl-tiny -> FP32 ONNX bundle (parity vs PyTorch is part of export)")
    bundle = export_model("edgevl-tiny", out / "edgevl-tiny-fp32", force=True)

    backends = [b for b in installed_backends() if b != "tensorrt"]
    step(f"2. answers from the on-device runtime ({', '.join(backends)})")
    scene = make_scene("test", 0)
    for backend in backends:
        vlm = edgevl.load(bundle.path, backend=backend, verbose=False)
        print(f"-- {backend}")
        for qa in scene_qas(scene):
            r = vlm.generate(scene.image(), qa.question, channels="rgb")
            mark = "ok " if r.text == qa.answer else "XX "
            print(f"   {mark}{qa.question:<45} -> {r.text}   ({r.timings_ms['total']:.0f} ms)")
        vlm.close()

    step(f"3. exact-match accuracy on {args.scenes} held-out scenes")
    for backend in backends:
        vlm = edgevl.load(bundle.path, backend=backend, verbose=False)
        res = evaluate(vlm.answer, n=args.scenes)
        by_task = " ".join(f"{k}={v:.2f}" for k, v in res["by_task"].items())
        print(f"   {backend:<12} fp32  accuracy {res['accuracy']:.3f}  ({by_task})")
        vlm.close()
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; bundles under {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
