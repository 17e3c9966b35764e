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
min-max (checked on ORT 1.31).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

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
    """Collect activation ranges of ``model_path`` over ``feeds`` into ORT's JSON range cache."""
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
        calibrator.collect_data(make_reader(feeds))
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache_path)
    return cache_path


def has_external_data(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def quantize(model_path: Path, out_path: Path, cache_path: Path, method: str, op_types, exclude=(),
             per_channel: bool = True, reduce_range: bool = True) -> Path:
    """Q/DQ INT8: per-channel symmetric int8 weights, per-tensor symmetric int8 activations.

    Q/DQ sit on the *inputs* of MatMul/Gemm (ONNX Runtime fuses DQ->MatMul into integer
    MatMulIntegerToFloat-style kernels with a float output); their outputs are not re-quantized,
    because their consumers (bias Add, norms, GELU, the logits) run in float anyway: a Q/DQ pair
    there would only add rounding (quantized logits tie at the argmax) and work. Conv keeps its
    output Q/DQ, which ONNX Runtime needs to fuse QLinearConv."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    external = has_external_data(model_path)
    with quiet():
        quantize_static(str(model_path), str(out_path), calibration_data_reader=None,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                        per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude), use_external_data_format=external,
                        calibrate_method=ort_method(method), calibration_cache_path=str(cache_path),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "OpTypesToExcludeOutputQuantization": [t for t in op_types if t != "Conv"]})
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
