"""INT8 OpenVINO IR with NNCF, for `edgevl build --target openvino --precision int8`.

Why NNCF here rather than OpenVINO reading the portable Q/DQ ONNX: NNCF's OpenVINO backend
places quantizers where the CPU plugin's INT8 kernels want them (transformer preset: MatMuls
and their inputs, not norms/softmax/residual adds); MEASURED.md measured the vision encoder at
3.6-4.0x PyTorch eager with nncf.quantize vs 2.6-2.7x for OpenVINO running ONNX Runtime's Q/DQ
ONNX. It is calibrated on the same feeds as the Q/DQ parts, keeps the same float nodes
(``ignored_scope``; OpenVINO's ONNX frontend names each op after its ONNX node), and is written
next to them as ``parts[p].artifacts.openvino``. The Q/DQ ONNX stays the part's ``onnx`` for
every other backend.
"""

from __future__ import annotations

from pathlib import Path

OPENVINO_DIR = "openvino"


def nncf_quantize_openvino(src: Path, out_xml: Path, feeds: list[dict], ignored: list[str] = (),
                           fast_bias_correction: bool = True) -> dict:
    import nncf
    import openvino as ov

    from edgevl.exporters.quantize.qdq import quiet

    model = ov.Core().read_model(str(src))
    with quiet():
        quantized = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(feeds), fast_bias_correction=fast_bias_correction,
                                  ignored_scope=nncf.IgnoredScope(names=list(ignored), validate=False))
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    return {"tool": "nncf.quantize (OpenVINO backend, ModelType.TRANSFORMER)", "FakeQuantize": fq,
            "ignored": list(ignored), "samples": len(feeds)}


def add_openvino_int8(writer, feeds: dict, plans: dict) -> dict:
    """``after_qdq`` hook of quantize_bundle: an NNCF INT8 IR per quantized part."""
    artifacts, parts = {}, {}
    for part, plan in plans.items():
        rel = f"{OPENVINO_DIR}/{part}.xml"
        info = nncf_quantize_openvino(plan.source, writer.file(rel), feeds[part], plan.excluded)
        writer.manifest["parts"][part].setdefault("artifacts", {})["openvino"] = rel
        artifacts[f"openvino:{part}"] = f"parts.{part}.artifacts.openvino ({rel}: NNCF INT8 IR)"
        parts[part] = info
    return {"artifacts": artifacts, "openvino": parts}


def runtime_precisions(compiled_model) -> dict[str, int]:
    """How many ops of a compiled OpenVINO model run in each precision (CPU plugin's runtime
    model: ``runtimePrecision`` per executed node). INT8 execution shows as i8/u8."""
    from collections import Counter

    counts: Counter = Counter()
    for op in compiled_model.get_runtime_model().get_ops():
        info = op.get_rt_info()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        counts[precision] += 1
    return dict(counts)


def int8_executed_ops(compiled_model) -> list[str]:
    """Names of executed (non-reorder) ops whose runtime precision is i8/u8."""
    out = []
    for op in compiled_model.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else ""
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
        if precision in ("i8", "u8") and layer not in ("Reorder", "Input", "Output", "Const"):
            out.append(f"{layer}:{op.get_friendly_name()}")
    return out
