"""OpenVINO runner: CPU (and GPU/NPU/AUTO where present), from ONNX or OpenVINO IR (.xml).

Precision names mean what they say. OpenVINO's CPU plugin runs bf16 by default on CPUs that
have it (and f16 on ARM), so an "fp32" bundle sets INFERENCE_PRECISION_HINT=f32 explicitly;
"bf16" and "fp16" are precisions of their own and are refused where the hardware lacks them.
Quantized bundles (Q/DQ INT8, weight-only) keep f32 for whatever stays in float.

Decode-step specialisation. OpenVINO's CPU plugin re-infers shapes and re-prepares kernels on
every call of a model with dynamic shapes; for a decoder that is about a fifth of edgevl-tiny's
decode step and 15-20% of a 135M-parameter one's (benchmarks/results/openvino_step.md). So the
runner also compiles the decoder with batch 1 and one new token fixed (the cache length stays
dynamic) and sends every single-sequence decode step there; prefill and batched steps use the
general model. The price is a second copy of the decoder's weights in memory (the CPU plugin
repacks weights per compiled model), so ``static_step="auto"`` (the default) does it only while
that copy fits in an eighth of the memory available at load time; ``True``/``False`` force it on
or off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevl.errors import BackendUnavailable, BundleError, ConfigError
from edgevl.runtimes.base import Runner, TensorInfo

_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def _dtype_name(element_type) -> str:
    return element_type.to_dtype().name


def _shape(partial_shape) -> tuple:
    return tuple(d.get_length() if d.is_static else None for d in partial_shape)


def _declared_name(compiled_port, model_port) -> str:
    names = compiled_port.get_names() & model_port.get_names()
    return sorted(names)[0] if names else compiled_port.get_any_name()


def _weights_bytes(path: Path) -> int:
    """Bytes of a model's weights on disk: IR .bin, or ONNX file plus external data files."""
    if path.suffix == ".xml":
        return path.with_suffix(".bin").stat().st_size if path.with_suffix(".bin").is_file() else 0
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*") if f.is_file())


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def want_static_step(setting, weights_bytes: int, available: int | None) -> bool:
    """Whether to compile the decode-step specialisation (see the module docstring)."""
    if setting in (True, "on", "true", "1"):
        return True
    if setting in (False, "off", "false", "0", None):
        return False
    if setting != "auto":
        raise ConfigError(f"openvino option static_step={setting!r}: use 'auto', True or False")
    return available is not None and weights_bytes <= available / 8


def is_decoder(model) -> bool:
    names = set().union(*(p.get_names() for p in model.inputs))
    return {"inputs_embeds", "past_len", "past_key.0"} <= names


class _Compiled:
    """One compiled model and its infer request, called by port index (no name lookups).

    Inputs are set as tensors sharing the numpy buffers; outputs are copied out, because the
    request reuses their memory on its next call."""

    def __init__(self, compiled, model):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        # Name ports as the graph declares them: compiling fuses nodes and a port can gain the names of
        # the tensors fused into it (e.g. a MatMul's before its bias Add), so get_any_name() may pick one.
        self.in_names = [_declared_name(p, q) for p, q in zip(compiled.inputs, model.inputs)]
        self.out_names = [_declared_name(p, q) for p, q in zip(compiled.outputs, model.outputs)]

    def infer(self, feeds: dict) -> dict:
        import openvino as ov

        request = self.request
        # The list keeps every tensor (and any contiguous copy it wraps) alive until infer() returns:
        # a shared-memory tensor does not own its buffer, the Python object does.
        tensors = [ov.Tensor(np.ascontiguousarray(feeds[name]), shared_memory=True) for name in self.in_names]
        for i, tensor in enumerate(tensors):
            request.set_input_tensor(i, tensor)
        request.infer()
        return {name: request.get_output_tensor(i).data.copy() for i, name in enumerate(self.out_names)}


def _step_shapes(model) -> dict:
    """The decoder's inputs with batch 1 and one new token fixed; the cache length stays dynamic."""
    import openvino as ov

    shapes = {}
    for port in model.inputs:
        ps = port.get_partial_shape()
        names = port.get_names()
        if "inputs_embeds" in names:
            shapes[port] = ov.PartialShape([1, 1, ps[2]])
        elif "past_len" in names:
            shapes[port] = ov.PartialShape([1])
        elif "position_ids" in names:                 # multimodal RoPE (3, B, T)
            shapes[port] = ov.PartialShape([3, 1, 1])
        elif "image_span" in names:                  # (B, 2), the image_bidirectional variant
            shapes[port] = ov.PartialShape([1, 2])
        else:                                         # past_key.i / past_value.i (B, KV, C, Dh)
            shapes[port] = ov.PartialShape([1, ps[1], -1, ps[3]])
    return shapes


def inference_precision(precision: str) -> str:
    """The INFERENCE_PRECISION_HINT for a bundle precision (quantized ones keep f32 floats)."""
    return _HINTS.get(precision, "f32")


class OpenVINORunner(Runner):
    """Options: ``hint`` ("LATENCY" or "THROUGHPUT"), ``cache_dir`` (OpenVINO model cache),
    ``static_step`` ("auto", True, False: the decode-step specialisation, decoder only)."""

    backend = "openvino"

    def _load(self):
        import openvino as ov

        core = ov.Core()
        device = (self.device or "CPU").upper()
        if device not in ("AUTO",) and not any(d.startswith(device) for d in core.available_devices):
            raise BackendUnavailable(f"openvino: device {device} not found; available: {core.available_devices}")
        hint = inference_precision(self.precision)
        if hint in ("bf16", "f16") and device == "CPU":
            caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            needed = {"bf16": "BF16", "f16": "FP16"}[hint]
            if needed not in caps:
                raise BackendUnavailable(
                    f"openvino: precision {self.precision} needs {needed} support, which this CPU lacks "
                    f"(it has {', '.join(caps)}); use an fp32 or int8 bundle here")
        config = {"INFERENCE_PRECISION_HINT": hint,
                  "PERFORMANCE_HINT": self.options.get("hint", "LATENCY")}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        if self.options.get("cache_dir"):
            config["CACHE_DIR"] = str(self.options["cache_dir"])
        if not self.path.is_file():
            raise BundleError(f"{self.path}: model file is missing")
        try:
            model = core.read_model(str(self.path))
            self.compiled = core.compile_model(model, device, config)
            self._main = _Compiled(self.compiled, model)
            self._step = None
            setting = self.options.get("static_step", "auto")
            if is_decoder(model) and want_static_step(setting, _weights_bytes(self.path),
                                                      available_memory_bytes() if device == "CPU" else None):
                step_model = model.clone()               # shares the constants: no second mmap of the weights
                step_model.reshape(_step_shapes(step_model))
                self._step = _Compiled(core.compile_model(step_model, device, config), step_model)
        except RuntimeError as e:
            raise BundleError(f"openvino could not load {self.path}: {e}") from e
        inputs = [TensorInfo(n, _dtype_name(p.get_element_type()), _shape(p.get_partial_shape()))
                  for n, p in zip(self._main.in_names, self.compiled.inputs)]
        outputs = [TensorInfo(n, _dtype_name(p.get_element_type()), _shape(p.get_partial_shape()))
                   for n, p in zip(self._main.out_names, self.compiled.outputs)]
        self.step_calls = 0
        return inputs, outputs

    @property
    def has_static_step(self) -> bool:
        """Whether single-sequence decode steps run on the batch-1, one-token compiled model."""
        return self.activate()._step is not None

    def _infer(self, feeds):
        if self._step is not None and feeds["inputs_embeds"].shape[:2] == (1, 1):
            self.step_calls += 1
            return self._step.infer(feeds)
        return self._main.infer(feeds)

    def _close(self):
        self.compiled = self._main = self._step = None

    @property
    def execution_precision(self) -> str:
        """What the compiled model actually runs its float math in (read back from OpenVINO)."""
        return str(self.activate().compiled.get_property("INFERENCE_PRECISION_HINT"))
