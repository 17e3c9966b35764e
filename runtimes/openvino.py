"""OpenVINO runner: CPU (and GPU/NPU/AUTO where present), from ONNX or OpenVINO IR (.xml).

Precision names mean what they say. OpenVINO's CPU plugin runs bf16 by default on CPUs that
have it (and f16 on ARM), so an "fp32" bundle sets INFERENCE_PRECISION_HINT=f32 explicitly;
"bf16" and "fp16" are precisions of their own and are refused where the hardware lacks them.
Quantized bundles (Q/DQ INT8, weight-only) keep f32 for whatever stays in float.
"""

from __future__ import annotations

from edgevl.errors import BackendUnavailable, BundleError
from edgevl.runtimes.base import Runner, TensorInfo

_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def _dtype_name(element_type) -> str:
    return element_type.to_dtype().name


def _shape(partial_shape) -> tuple:
    return tuple(d.get_length() if d.is_static else None for d in partial_shape)


def _declared_name(compiled_port, model_port) -> str:
    names = compiled_port.get_names() & model_port.get_names()
    return sorted(names)[0] if names else compiled_port.get_any_name()


def inference_precision(precision: str) -> str:
    """The INFERENCE_PRECISION_HINT for a bundle precision (quantized ones keep f32 floats)."""
    return _HINTS.get(precision, "f32")


class OpenVINORunner(Runner):
    """Options: ``hint`` ("LATENCY" or "THROUGHPUT"), ``cache_dir`` (OpenVINO model cache)."""

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
        except RuntimeError as e:
            raise BundleError(f"openvino could not load {self.path}: {e}") from e
        self.request = self.compiled.create_infer_request()
        # Name ports as the graph declares them: compiling fuses nodes and a port can gain the names of
        # the tensors fused into it (e.g. a MatMul's before its bias Add), so get_any_name() may pick one.
        in_names = [_declared_name(p, q) for p, q in zip(self.compiled.inputs, model.inputs)]
        out_names = [_declared_name(p, q) for p, q in zip(self.compiled.outputs, model.outputs)]
        inputs = [TensorInfo(n, _dtype_name(p.get_element_type()), _shape(p.get_partial_shape()))
                  for n, p in zip(in_names, self.compiled.inputs)]
        outputs = [TensorInfo(n, _dtype_name(p.get_element_type()), _shape(p.get_partial_shape()))
                   for n, p in zip(out_names, self.compiled.outputs)]
        self._out_ports = list(self.compiled.outputs)
        self._names = [o.name for o in outputs]
        return inputs, outputs

    def _infer(self, feeds):
        result = self.request.infer(feeds, share_inputs=True)
        return {name: result[port] for name, port in zip(self._names, self._out_ports)}

    def _close(self):
        self.request = None
        self.compiled = None

    @property
    def execution_precision(self) -> str:
        """What the compiled model actually runs its float math in (read back from OpenVINO)."""
        return str(self.activate().compiled.get_property("INFERENCE_PRECISION_HINT"))
