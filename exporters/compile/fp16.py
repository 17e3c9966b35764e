"""FP32 ONNX -> mixed FP16 ONNX for strongly typed TensorRT (11.x), with onnx alone.

TensorRT 11 runs every tensor in the type the graph gives it, so FP16 means an FP16 graph.
NVIDIA's route is ModelOpt AutoCast (not a dependency here); this is a careful, deterministic
conversion made for the graphs edgevl exports:

- **compute-heavy ops run FP16**: MatMul, Gemm, Conv, ConvTranspose;
- **numerically sensitive ops stay FP32**: softmax, every normalization, reductions, Pow,
  Sqrt, Reciprocal, Exp/Log, Sin/Cos (rotary angles), Range, CumSum, Q/DQ, random ops;
- **everything else follows its inputs**: it runs FP16 if any non-constant float input is
  FP16, else FP32. So an RMSNorm chain (``x.float()`` -> Pow -> ReduceMean -> Add eps -> Sqrt
  -> Div) stays FP32 end to end, and so do the rotary angles computed from integer positions;
- a Cast node is inserted wherever a tensor crosses precisions (one per tensor and direction);
  float constants get an FP16 copy, clipped to +-65504 (masks of float32.min become -65504,
  which still zeroes a softmax entry);
- graph inputs and outputs keep their FP32 type (the runtime and its KV cache are FP32).

Graphs with control flow (If/Loop/Scan) are refused rather than converted half-way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevl.errors import CompileError
from edgevl.exporters.onnx_io import PROTOBUF_LIMIT, save_onnx

FP16_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
FP32_OPS = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
    "RMSNormalization", "SimplifiedLayerNormalization", "LpNormalization", "MeanVarianceNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Sin", "Cos", "Range", "CumSum",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Multinomial",
})
TYPE_AGNOSTIC = frozenset({"Shape", "Size", "Cast", "NonZero"})   # take any float input as it is
FIXED_INPUTS = {"Resize": {1, 2}, "Upsample": {1}, "Dropout": {1}}  # float inputs whose type is fixed by the op
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
FP16_MAX = 65504.0


def convert_model(model, base_dir: str | Path = "", fp32_ops=FP32_OPS, fp16_ops=FP16_OPS):
    """Return a mixed-precision copy of ``model`` (an onnx.ModelProto) and a small report.
    Initializers may stay in external data (``base_dir`` is where it lives): only the
    constants that need an FP16 copy are read."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)       # not SerializeToString: that fails past protobuf's 2 GB
    model = copy
    graph = model.graph
    bad = sorted({n.op_type for n in graph.node if n.op_type in CONTROL_FLOW})
    if bad:
        raise CompileError(f"FP16 conversion does not handle control flow ({', '.join(bad)}); build FP32, use "
                           "TensorRT 10 (--fp16 as a builder flag), or convert with NVIDIA ModelOpt AutoCast")
    typed = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    elem = {v.name: v.type.tensor_type.elem_type
            for v in list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)}
    FLOAT = TensorProto.FLOAT
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    for name, t in consts.items():
        elem.setdefault(name, t.data_type)

    prec: dict[str, str] = {v.name: "fp32" for v in graph.input if elem.get(v.name) == FLOAT}
    versions: dict[tuple, str] = {}
    new_inits, nodes = [], []
    report = {"fp16_nodes": 0, "fp32_nodes": 0, "casts": 0, "clipped_constants": 0}

    def const_version(name: str, target: str) -> str:
        if target == "fp32":
            return name
        key = (name, "fp16")
        if key not in versions:
            values = numpy_helper.to_array(consts[name], str(base_dir)).astype(np.float32)
            if np.abs(values[np.isfinite(values)]).max(initial=0.0) > FP16_MAX:
                report["clipped_constants"] += 1
            values = np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16)
            new_inits.append(numpy_helper.from_array(values, f"{name}__fp16"))
            versions[key] = f"{name}__fp16"
        return versions[key]

    def version(name: str, target: str) -> str:
        if name in consts:
            return const_version(name, target)
        have = prec.get(name)
        if have is None:
            raise CompileError(f"FP16 conversion: the type of tensor {name!r} is unknown (shape inference failed "
                               "there); build FP32 or convert with NVIDIA ModelOpt AutoCast")
        if have == target:
            return name
        key = (name, target)
        if key not in versions:
            out = f"{name}__{target}"
            to = TensorProto.FLOAT16 if target == "fp16" else FLOAT
            nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}__cast"))
            report["casts"] += 1
            versions[key] = out
        return versions[key]

    # graph outputs: produced under an internal name, re-exposed in FP32 at the end
    out_names = {v.name for v in graph.output if elem.get(v.name) == FLOAT and v.name not in prec}
    internal = {n: f"{n}__graph_out" for n in out_names}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in internal:
                node.input[i] = internal[name]
        for i, name in enumerate(node.output):
            if name in internal:
                node.output[i] = internal[name]
    for n, inner in internal.items():
        elem[inner] = elem[n]

    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in consts:
            nodes.append(node)
            continue
        fixed = FIXED_INPUTS.get(node.op_type, set())
        float_in = [(i, n) for i, n in enumerate(node.input) if n and elem.get(n) == FLOAT and i not in fixed]
        float_out = [n for n in node.output if n and elem.get(n) == FLOAT]
        if node.op_type in TYPE_AGNOSTIC:
            for n in float_out:
                prec[n] = "fp32"   # Cast(to=FLOAT): an explicit FP32 tensor
            nodes.append(node)
            continue
        if node.op_type in fp16_ops:
            target = "fp16"
        elif node.op_type in fp32_ops:
            target = "fp32"
        else:
            dynamic = [n for _, n in float_in if n not in consts]
            target = "fp16" if any(prec.get(n) == "fp16" for n in dynamic) else "fp32"
        for i, n in float_in:
            node.input[i] = version(n, target)
        for n in float_out:
            prec[n] = target
        report[f"{target}_nodes"] += 1
        nodes.append(node)

    for n, inner in internal.items():
        if prec.get(inner) == "fp16":
            nodes.append(helper.make_node("Cast", [inner], [n], to=FLOAT, name=f"{n}__out_cast"))
            report["casts"] += 1
        else:
            nodes.append(helper.make_node("Identity", [inner], [n], name=f"{n}__out"))

    del graph.node[:]
    graph.node.extend(_drop_dead_constants(nodes, {v.name for v in graph.output}))
    graph.initializer.extend(new_inits)
    used = {n for node in graph.node for n in node.input}
    kept = [t for t in graph.initializer if t.name in used or t.name in {v.name for v in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    if model.ByteSize() < PROTOBUF_LIMIT:   # (bigger models are checked by TensorRT's parser)
        try:   # a type error anywhere in the converted graph is a conversion bug: fail here, not in TensorRT
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        except Exception as e:  # onnx raises InferenceError / ValidationError
            raise CompileError(f"FP16 conversion produced an inconsistent graph ({e}); build FP32 or convert with "
                               "NVIDIA ModelOpt AutoCast") from e
    return model, report


def _drop_dead_constants(nodes, outputs: set) -> list:
    used = {n for node in nodes for n in node.input} | outputs
    return [n for n in nodes if n.op_type != "Constant" or any(o in used for o in n.output)]


def convert_file(src: str | Path, dst: str | Path) -> dict:
    """Convert an ONNX file (external data included) and save it at ``dst``; returns the report."""
    import onnx

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    converted, report = convert_model(model, base_dir=src.parent)
    onnx.load_external_data_for_model(converted, str(src.parent))   # the FP32 weights that stay FP32
    save_onnx(converted, dst)
    return report
