"""`edgevl build`: export -> quantize -> compile for one target, in one command.

    build_bundle("edgevl-tiny", "openvino", "int8", "out/tiny-ov-int8", calib="world")

Stages run in a private staging directory next to ``out``; only the last stage writes ``out``
(atomically, through BundleWriter or compile_bundle), so a failure anywhere leaves no partial
output. Everything that can be refused is refused before the export starts.

What each precision means per target (CPU targets have no useful FP16 here):

| precision | onnxruntime                     | openvino                               | tensorrt               |
|-----------|---------------------------------|----------------------------------------|------------------------|
| fp32      | FP32 ONNX                       | FP32 IR (f32 inference hint)           | FP32 engines           |
| fp16      | refused: the CPU EP runs FP16   | IR with FP16 weights, f16 inference:   | FP16 engines           |
|           | graphs through casts, slower    | for GPU/NPU/ARM/AMX-FP16 CPUs; runners |                        |
|           | than FP32                       | refuse it on CPUs without FP16         |                        |
| int8      | the fastest deployment: per part the fastest measured candidate that   | INT8 engines from Q/DQ |
| int4      | keeps the accuracy gate (INT8 vision, INT8 or INT4 weight-only decoder;| int4: refused          |
|           | quantize/composite.py)                                                 |                        |
| int8-qdq  | Q/DQ ONNX, uint8 activations    | NNCF INT8 IR (+ int8 Q/DQ ONNX)        | = int8                 |
| int8-wo   | MatMulNBits 8-bit decoder       | NNCF INT8_SYM weight-compressed IR     | refused (no MatMulNBits|
| int4-wo   | MatMulNBits 4-bit decoder       | NNCF INT4_SYM (group = block) IR       | in TensorRT)           |

The FP32 export every precision starts from is cached by checkpoint content
(exporters/export_cache.py), so building several precisions of one checkpoint exports it once.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

from edgevl.bundle import MANIFEST, Bundle, BundleWriter, load_bundle
from edgevl.errors import BackendUnavailable, BundleError, ConfigError

TARGETS = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "int4", "int8-qdq", "int8-wo", "int4-wo")
COMPOSITE = ("int8", "int4")        # composed per part by measurement (quantize/composite.py)
OPENVINO_DIR = "openvino"


def check_request(target: str, precision: str, out: Path, force: bool) -> None:
    """Every refusal that needs no work: unknown names, meaningless combinations, missing tools."""
    if target not in TARGETS:
        raise ConfigError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if target == "onnxruntime" and precision == "fp16":
        raise ConfigError("--precision fp16 is not offered for --target onnxruntime: ONNX Runtime's CPU execution "
                          "provider runs FP16 graphs through casts around most ops, slower than FP32. Use fp32 or "
                          "int8 for CPUs, --target openvino for FP16 IR (GPU/NPU), or --target tensorrt")
    if target == "tensorrt" and (precision.endswith("-wo") or precision == "int4"):
        raise ConfigError(f"--precision {precision} is not available for --target tensorrt: weight-only bundles use "
                          "ONNX Runtime's MatMulNBits contrib op, which TensorRT does not run; use int8 or fp16")
    if target == "openvino" and importlib.util.find_spec("openvino") is None:
        raise BackendUnavailable("--target openvino needs OpenVINO: pip install edgevl[openvino]")
    if target == "tensorrt":
        if importlib.util.find_spec("edgevl.exporters.compile.tensorrt") is None:
            raise BackendUnavailable("--target tensorrt needs edgevl's TensorRT compile step "
                                     "(edgevl.exporters.compile.tensorrt), which this install lacks")
        if importlib.util.find_spec("tensorrt") is None:
            raise BackendUnavailable("--target tensorrt needs TensorRT and an NVIDIA GPU on this machine (engines "
                                     "are built on the device that runs them): pip install edgevl[tensorrt]")
    if out.exists() and not force:
        raise BundleError(f"{out} already exists; choose another --out or pass --force to replace it")


def add_openvino_ir(writer: BundleWriter, precision: str, log) -> None:
    """An OpenVINO IR for every part that has none yet (the quantizers add their own)."""
    import openvino as ov

    core = ov.Core()
    for part, spec in writer.manifest["parts"].items():
        artifacts = spec.setdefault("artifacts", {})
        if "openvino" in artifacts:
            continue
        rel = f"{OPENVINO_DIR}/{part}.xml"
        model = core.read_model(str(writer.tmp / spec["onnx"]))
        ov.save_model(model, str(writer.file(rel)), compress_to_fp16=precision == "fp16")
        artifacts["openvino"] = rel
        log(f"  openvino IR {rel} ({'FP16' if precision == 'fp16' else 'FP32'} weights)")


def finish(staged: Bundle, out: Path, target: str, precision: str, force: bool, log) -> Bundle:
    """Copy the staged bundle to ``out`` with the target's artefacts and fields; atomic."""
    writer = BundleWriter(out, force=force)
    try:
        for rel in staged.manifest["files"]:
            if rel != MANIFEST:
                writer.copy_in(staged.path / rel, rel)
        manifest = {k: v for k, v in staged.manifest.items() if k != "files"}
        writer.manifest.update(manifest)
        writer.manifest["target"] = target
        writer.manifest["precision"] = "int8" if precision == "int8-qdq" else precision
        if target == "openvino":
            add_openvino_ir(writer, precision, log)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def build_bundle(model, target: str, precision: str, out, calib=None, force: bool = False, method: str = "percentile",
                 samples: int = 64, budget: float = 1.0, accept_loss: bool = False, eval_scenes: int = 200,
                 block_size: int | None = None, activations: str | None = None, threads: int | None = None, log=print,
                 progress: bool = True, compile_options: dict | None = None, kv_cache: str = "auto",
                 image_size: tuple[int, int] | None = None) -> Bundle:
    """Export ``model``, quantize to ``precision``, compile for ``target``; -> the bundle at ``out``.
    ``activations`` (int8): "uint8" for --target onnxruntime (x86 kernels), else "int8". ``kv_cache``
    (int8 / int4 on ONNX Runtime): the lowered decoder's cache, "auto" (int8 when measured faster
    within the accuracy gate), "int8" or "float32". ``image_size`` (W, H): the fixed image size of a
    family that resizes per image (Qwen2-VL, --image-size)."""
    from edgevl.exporters.export_cache import cached_export

    out = Path(out)
    check_request(target, precision, out, force)
    if precision in ("int8", "int8-qdq") and calib is None:
        calib = "world"
        log("build: no --calib given; calibrating on the synthetic world's scenes (pass --calib for your own data)")
    stages = ["export"] + (["quantize"] if precision not in ("fp32", "fp16") else []) + ["compile"]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(stages), desc=f"build {target} {precision}", unit="stage")
        log = bar.write

    def advance(name):
        if bar is not None:
            bar.set_postfix_str(name)
            bar.update(1)

    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.build.", dir=out.parent))
    try:
        current = cached_export(model, stage_dir / "fp32", log=log, image_size=image_size)
        advance("exported")
        activations = activations or ("uint8" if target == "onnxruntime" else "int8")
        current = _quantize_stage(current, stage_dir, target, precision, calib, method, samples, budget, accept_loss,
                                  eval_scenes, block_size, activations, threads, log, kv_cache)
        if current is not None and "quantize" in stages:
            advance("quantized")
        if target == "tensorrt":
            from edgevl.exporters.compile import compile_bundle

            staged = finish(current, stage_dir / "final", target, precision, True, log)
            options = dict(compile_options or {})
            options["precision"] = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8-qdq": "int8"}[precision]
            result = compile_bundle(staged, "tensorrt", out=out, force=force, log=log, **options)
        else:
            result = finish(current, out, target, precision, force, log)
        advance("compiled")
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(stage_dir, ignore_errors=True)
    log(f"build: wrote {result.path} ({target}, {precision}) in {time.perf_counter() - t0:.1f} s")
    return load_bundle(result.path)


def _quantize_stage(fp32: Bundle, stage_dir: Path, target, precision, calib, method, samples, budget, accept_loss,
                    eval_scenes, block_size, activations, threads, log, kv_cache="auto") -> Bundle:
    if precision in ("fp32", "fp16"):
        return fp32
    if precision in COMPOSITE and target != "tensorrt":
        from edgevl.exporters.quantize.composite import CompositeRecipe, composite_bundle

        recipe = CompositeRecipe(decoder_bits=8 if precision == "int8" else 4, block_size=block_size, kv_cache=kv_cache)
        return composite_bundle(fp32, stage_dir / precision, target, recipe, calib=calib or "world",
                                budget_points=budget, accept_loss=accept_loss, eval_scenes=eval_scenes,
                                threads=threads, log=log)
    if precision in ("int8", "int8-qdq"):
        from edgevl.exporters.quantize.ptq import quantize_bundle
        from edgevl.exporters.quantize.recipes import PTQRecipe

        after = None
        if target == "openvino":
            from edgevl.exporters.quantize.openvino_int8 import add_openvino_int8

            after = add_openvino_int8
        recipe = PTQRecipe(method=method, samples=samples, budget_points=budget, accept_loss=accept_loss,
                           eval_scenes=eval_scenes, activations=activations)
        return quantize_bundle(fp32, calib, stage_dir / "int8", recipe, threads=threads, log=log, progress=False,
                               after_qdq=after)
    from edgevl.exporters.quantize.recipes import WeightOnlyRecipe, default_block_size, weight_only_backends
    from edgevl.exporters.quantize.weight_only import weight_only_bundle

    bits = 8 if precision == "int8-wo" else 4
    backends = weight_only_backends(target)
    recipe = WeightOnlyRecipe(bits=bits, block_size=block_size or default_block_size(backends), backends=backends)
    return weight_only_bundle(fp32, stage_dir / precision, recipe, budget_points=budget, accept_loss=accept_loss,
                              eval_scenes=eval_scenes, threads=threads, log=log)
