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
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    from edgevl.exporters.quantize.qdq import quiet

    model = ov.Core().read_model(str(src))
    # 7-bit weights everywhere (NNCF's default fixes the first layer only): CPUs without VNNI run
    # int8 dot products through vpmaddubsw, whose int16 sums saturate with full-range weights
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    with quiet():
        quantized = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(feeds), fast_bias_correction=fast_bias_correction,
                                  ignored_scope=nncf.IgnoredScope(names=list(ignored), validate=False),
                                  advanced_parameters=advanced)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    return {"tool": "nncf.quantize (OpenVINO backend, ModelType.TRANSFORMER)", "FakeQuantize": fq,
            "ignored": list(ignored), "samples": len(feeds)}


def add_openvino_int8(writer, feeds: dict, plans: dict) -> dict:
    """``after_qdq`` hook of quantize_bundle: an NNCF INT8 IR per quantized part. An IR whose
    compiled outputs break the part contract (OpenVINO's INT8 LM head bug, see
    ptq.backends_breaking_contract) is redone with the LM head ignored, else refused."""
    import onnx

    from edgevl.errors import QuantizationError
    from edgevl.exporters.quantize.float_rules import lm_head_node
    from edgevl.exporters.quantize.ptq import backends_breaking_contract

    artifacts, parts = {}, {}
    for part, plan in plans.items():
        rel = f"{OPENVINO_DIR}/{part}.xml"
        ignored = list(plan.excluded)
        info = nncf_quantize_openvino(plan.source, writer.file(rel), feeds[part], ignored)
        broken = backends_breaking_contract(plan.source, writer.file(rel))
        head = lm_head_node(onnx.load(str(plan.source), load_external_data=False))
        if broken and head and head not in ignored:
            info = nncf_quantize_openvino(plan.source, writer.file(rel), feeds[part], ignored + [head])
            info["lm_head"] = f"ignored: {'; '.join(broken)}"
            broken = backends_breaking_contract(plan.source, writer.file(rel))
        if broken:
            raise QuantizationError(f"the NNCF INT8 IR of part {part!r} breaks the part contract: {'; '.join(broken)}")
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
