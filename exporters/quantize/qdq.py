"""One ONNX part -> Q/DQ INT8 ONNX with ONNX Runtime's quantization tools.

Why ONNX Runtime's quantize_static (for every part of the portable Q/DQ bundle): it offers the
three calibration methods the CLI exposes (MinMax, Entropy, Percentile) over arbitrary ONNX
graphs, including the KV-cache decoder with its dynamic axes, writes standard
QuantizeLinear/DequantizeLinear (QuantFormat.QDQ) that ONNX Runtime, OpenVINO and TensorRT all
run as INT8, and its per-tensor ranges can be cached so the sensitivity pass re-quantizes in
seconds without calibrating again. NNCF is used where it is the better tool: the OpenVINO IR
of `edgevl build --target openvino` (openvino_int8.py; MEASURED.md: 3.6-4.0x vs 2.6-2.7x for
OpenVINO running this Q/DQ ONNX) and QAT (qat.py).

Calibration runs once per part (``calibrate``) into ORT's JSON range cache; ``quantize`` then
reads the cache. Entropy is calibrated with 2048 histogram bins: quantize_static's own default
(128 bins, 128 quantized bins) leaves the KL search a single candidate, so its "entropy" equals
min-max (checked on ORT 1.31); and its KL search is replaced by a vectorised one (kl_threshold).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np

from edgevl.errors import QuantizationError

MAX_IR_VERSION = 10     # ONNX Runtime 1.31 rejects IR 14 (MEASURED.md item 5)


@contextlib.contextmanager
def quiet():
    """ORT's quantization tools print progress and log warnings on the root logger (e.g. per-channel
    axes on LayerNorm weights, MEASURED.md item 7); keep them out of the user's terminal."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def calibrator_options(method: str, percentile: float, bins: int) -> dict:
    if method == "entropy":
        return {"symmetric": True, "num_bins": bins, "num_quantized_bins": 255}
    if method == "percentile":
        return {"symmetric": True, "num_bins": bins, "percentile": percentile}
    return {"symmetric": True}


def calibrate(model_path: Path, feeds: list[dict], cache_path: Path, method: str, op_types,
              percentile: float = 99.999, bins: int = 2048) -> Path:
    """Collect activation ranges of ``model_path`` over ``feeds`` into ORT's JSON range cache.

    Feeds are collected in groups of equal shapes (ORT's histogram collector stacks one group's
    outputs into one array, so a prefill and a decode step cannot share a group), largest first,
    so the histogram range is set by the widest data and later groups only extend it. Each group
    goes to the calibrator in memory-bounded chunks (``memory_chunks``)."""
    import tempfile

    from onnxruntime.quantization import create_calibrator, save_tensors_data

    from edgevl.exporters.quantize.calibration import make_reader

    if not feeds:
        raise QuantizationError(f"no calibration feeds for {model_path.name}")
    with tempfile.TemporaryDirectory(prefix="edgevl-calib-") as tmp, quiet():
        calibrator = create_calibrator(Path(model_path), list(op_types),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=ort_method(method),
                                       use_external_data_format=has_external_data(model_path),
                                       extra_options=calibrator_options(method, percentile, bins))
        for group in shape_groups(feeds):
            for chunk in memory_chunks(group):
                calibrator.collect_data(make_reader(chunk))
        if method == "entropy":
            # ORT's KL search sums histograms with Python's sum() in a double loop: minutes per
            # part on 2 cores. Same search, vectorised (TensorRT's algorithm; instance-level only).
            calibrator.collector.get_entropy_threshold = kl_threshold
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache_path)
    return cache_path


def memory_chunks(group: list[dict], large_feed_bytes: int = 1 << 20, small_chunk: int = 8) -> list[list[dict]]:
    """Split a group of feeds into the chunks handed to one ``collect_data`` call each. ORT's
    calibrators keep every calibrated tensor of every feed of a call in memory until the call
    ends, then merge it into their ranges/histograms; for a 512-px SigLIP encoder that is ~2 GB
    per image (attention probabilities of every layer), and 64 images in one call ran a 24 GB
    machine out of memory. Large feeds go one per call, small ones a few at a time."""
    size = 1 if sum(v.nbytes for v in group[0].values()) >= large_feed_bytes else small_chunk
    return [group[i:i + size] for i in range(0, len(group), size)]


def shape_groups(feeds: list[dict]) -> list[list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for f in feeds:
        groups.setdefault(tuple((k, v.shape) for k, v in sorted(f.items())), []).append(f)
    return sorted(groups.values(), key=lambda g: -sum(v.size for v in g[0].values()))


def kl_threshold(histogram, num_quantized_bins: int):
    """The symmetric clipping threshold that minimises KL(P || Q) between the histogram clipped at
    the threshold (outliers folded into the edge bins) and its ``num_quantized_bins``-level
    quantization (TensorRT's entropy calibration). ``histogram``: ORT's (hist, edges, min, max,
    threshold), symmetric around zero. Returns (low, high) like ORT's get_entropy_threshold."""
    hist, edges, min_value, max_value = histogram[0].astype(np.float64), histogram[1], histogram[2], histogram[3]
    n = hist.size
    zero, half_q = n // 2, num_quantized_bins // 2
    csum = np.concatenate([[0.0], np.cumsum(hist)])
    best, best_kl = None, np.inf
    for i in range(half_q, zero + 1):
        start, end = zero - i, min(zero + i + 1, n)
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += csum[start]
        p[-1] += csum[n] - csum[end]
        merged = max(1, sliced.size // num_quantized_bins)
        level = np.minimum(np.arange(sliced.size) // merged, num_quantized_bins - 1)
        nonzero = p != 0
        sums = np.bincount(level, weights=sliced, minlength=num_quantized_bins)
        counts = np.bincount(level, weights=nonzero, minlength=num_quantized_bins)
        q = np.where(nonzero, sums[level] / np.maximum(counts[level], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_kl, best = kl, (edges[start], edges[end])
    if best is None:
        best = (edges[0], edges[-1])
    dtype = edges.dtype
    low, high = max(best[0], min_value), min(best[1], max_value)
    return np.array(low, dtype=dtype), np.array(high, dtype=dtype)


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL divergence after smoothing zeros (as ORT's smooth_distribution); inf if p or q is empty."""
    out = []
    for d in (p, q):
        zeros = d == 0
        n_nonzero = d.size - zeros.sum()
        if n_nonzero == 0:
            return np.inf
        d = d + eps * zeros - (eps * zeros.sum() / n_nonzero) * ~zeros
        out.append(d / d.sum())
    p, q = out
    return float(np.sum(p * np.log(p / q)))


def keep_full_range_for_attention(model_path: Path, cache_path: Path) -> list[str]:
    """Entropy ranges clip (and percentile's, a little; its cache keeps no histogram edges, so it
    is left as it is); for the inputs of activation x activation MatMuls
    (attention scores' q/k, softmax probabilities x v) clipping cuts exactly the large values
    that matter (the few high attention probabilities). Those tensors get their full symmetric
    range back (the histogram's outer edges, i.e. min-max). Measured on edgevl-tiny's vision
    part (16 held-out images): entropy everywhere cosine 0.9894 vs FP32; entropy with attention
    inputs at full range 0.9993; min-max 0.9997. Returns the tensors changed."""
    import json

    import onnx

    from edgevl.exporters.quantize.float_rules import activation_matmuls

    model = onnx.load(str(model_path), load_external_data=False)
    names = set(activation_matmuls(model))
    tensors = {i for n in model.graph.node if n.name in names for i in n.input}
    cache = json.loads(Path(cache_path).read_text())
    changed = []
    for name in sorted(tensors & set(cache["data"])):
        entry = cache["data"][name]
        edges = entry.get("bins")
        edges = edges.get("data") if isinstance(edges, dict) else None
        if not isinstance(edges, list) or len(edges) < 2:   # percentile's cache keeps no edges (99.999th clips little)
            continue
        entry["lowest"] = {"data": float(edges[0]), "dtype": "float32", "CLS": "numpy.array"}
        entry["highest"] = {"data": float(edges[-1]), "dtype": "float32", "CLS": "numpy.array"}
        changed.append(name)
    Path(cache_path).write_text(json.dumps(cache))
    return changed


def has_external_data(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def quantize(model_path: Path, out_path: Path, cache_path: Path, method: str, op_types, exclude=(),
             per_channel: bool = True, reduce_range: bool = True, activations: str = "int8") -> Path:
    """Q/DQ INT8: per-channel symmetric int8 weights, per-tensor activations (symmetric int8, or
    asymmetric uint8 with ``activations="uint8"``; see PTQRecipe.activations).

    Q/DQ sit on the *inputs* of MatMul/Gemm (ONNX Runtime fuses DQ->MatMul into integer
    MatMulIntegerToFloat-style kernels with a float output); their outputs are not re-quantized,
    because their consumers (bias Add, norms, GELU, the logits) run in float anyway: a Q/DQ pair
    there would only add rounding (quantized logits tie at the argmax) and work. Conv keeps its
    output Q/DQ, which ONNX Runtime needs to fuse QLinearConv. Every consumer gets its own Q/DQ
    pair (DedicatedQDQPair): ONNX Runtime fuses a DequantizeLinear into an integer kernel only
    when it has one consumer, so q/k/v projections sharing one pair ran as float MatMuls on
    dequantized inputs (SmolVLM-shaped vision: 36 of 97 MatMuls, INT8 only 1.03x FP32)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    external = has_external_data(model_path)
    with quiet():
        quantize_static(str(model_path), str(out_path), calibration_data_reader=None,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                        per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude), use_external_data_format=external,
                        calibrate_method=ort_method(method), calibration_cache_path=str(cache_path),
                        extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True,
                                       "OpTypesToExcludeOutputQuantization": [t for t in op_types if t != "Conv"],
                                       "DedicatedQDQPair": True})
    clamp_ir_version(out_path)
    return out_path


def clamp_ir_version(path: Path) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        onnx.save_model(model, str(path))


def count_qdq(path_or_model) -> dict:
    """QuantizeLinear/DequantizeLinear counts, int8 weight initializers, and which nodes consume
    dequantized inputs: what a test or `edgevl info` needs to say a part really is INT8."""
    import onnx

    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model), load_external_data=False)
    nodes = model.graph.node
    int8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    dq_outputs = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
    weights = {t.name for t in model.graph.initializer if t.data_type in int8 and len(t.dims) >= 2}
    return {
        "QuantizeLinear": sum(n.op_type == "QuantizeLinear" for n in nodes),
        "DequantizeLinear": sum(n.op_type == "DequantizeLinear" for n in nodes),
        "int8_weights": len(weights),
        "int8_ops": sorted({n.name for n in nodes if n.op_type in ("MatMul", "Gemm", "Conv")
                            and any(i in dq_outputs for i in n.input)}),
    }


def fold_weight_quantizers(path: Path) -> int:
    """QuantizeLinear on a constant weight -> the int8 weight itself (what quantize_static writes).

    Exporters of fake-quantized PyTorch models (NNCF's strip NATIVE + torch.onnx) keep FP32
    weights followed by QuantizeLinear/DequantizeLinear: correct, but the file holds FP32 and
    every runtime re-quantizes at load. Folding stores int8 weights (4x smaller) and the graph
    then reads like PTQ's: int8 initializer -> DequantizeLinear -> MatMul/Conv. Exact: the same
    float32 division and round-half-to-even as the QuantizeLinear kernel. Returns the count."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}

    def constant(name: str):
        while name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
        return None

    folded, drop = [], set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        x, scale = constant(node.input[0]), constant(node.input[1])
        zero = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        if x is None or scale is None or zero is None or x.ndim < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.size > 1:
            shape = [1] * x.ndim
            shape[axis % x.ndim] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        info = np.iinfo(zero.dtype)
        q = np.clip(np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zero.astype(np.int32), info.min, info.max)
        folded.append(numpy_helper.from_array(q.astype(zero.dtype), node.output[0]))
        drop.add(id(node))
    if not folded:
        return 0
    kept = [n for n in graph.node if id(n) not in drop]
    graph.ClearField("node")
    graph.node.extend(kept)
    graph.initializer.extend(folded)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    alive = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(alive)
    external = model.ByteSize() > (2 << 30) - (64 << 20)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return len(folded)
