"""ONNX Runtime runner: CPU (x86, ARM64); CUDA and TensorRT execution providers when present."""

from __future__ import annotations

from edgevl.errors import BackendUnavailable, BundleError
from edgevl.runtimes.base import Runner, TensorInfo

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16",
}
_PROVIDERS = {
    None: ["CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _shape(dims) -> tuple:
    return tuple(d if isinstance(d, int) else None for d in dims)


class OnnxRuntimeRunner(Runner):
    """Options: ``spinning`` (bool, default True: lowest latency for back-to-back calls; turn
    off when ORT shares cores with other work, see benchmarks), ``optimization`` ("all",
    "extended", "basic", "disabled"), ``profile`` (path prefix for ORT's JSON profile)."""

    backend = "onnxruntime"

    def _load(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        level = self.options.get("optimization", "all")
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[level]
        if not self.options.get("spinning", True):
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.options.get("profile"):
            opts.enable_profiling = True
            opts.profile_file_prefix = str(self.options["profile"])
        opts.log_severity_level = 3
        wanted = _PROVIDERS.get(self.device)
        if wanted is None:
            raise BackendUnavailable(f"onnxruntime: unknown device {self.device!r}; use cpu, cuda or tensorrt")
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BackendUnavailable(
                f"onnxruntime: {wanted[0]} is not available in this onnxruntime build (available: "
                f"{', '.join(available)}); install onnxruntime-gpu for CUDA/TensorRT, or use device='cpu'")
        if not self.path.is_file():
            raise BundleError(f"{self.path}: model file is missing")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=wanted)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError(f"onnxruntime could not load {self.path}: {e}") from e
        inputs = [TensorInfo(i.name, _ORT_TYPES.get(i.type, i.type), _shape(i.shape)) for i in self.session.get_inputs()]
        outputs = [TensorInfo(o.name, _ORT_TYPES.get(o.type, o.type), _shape(o.shape)) for o in self.session.get_outputs()]
        self._names = [o.name for o in outputs]
        return inputs, outputs

    def _infer(self, feeds):
        values = self.session.run(self._names, feeds)
        return dict(zip(self._names, values))

    def _close(self):
        self.session = None

    @property
    def providers(self) -> list[str]:
        return self.activate().session.get_providers()


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__

