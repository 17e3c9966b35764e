"""``edgevl compile --target tensorrt --via torch2trt``: build the vision engine straight from
PyTorch with torch2trt (NVIDIA-AI-IOT), skipping ONNX. Optional and small.

torch2trt is not on PyPI; Jetson users install it from source next to JetPack's PyTorch. It
sets TensorRT 10 builder flags for FP16 and uses implicit calibration for INT8, so here it
serves FP32/FP16 vision engines on TensorRT 10; INT8 goes through the bundle's Q/DQ ONNX. The
checkpoint is found through the manifest's ``model.source`` (it must exist on this device).
The engine gets the same sidecar as an ONNX-built one, so the runner treats both alike.
"""

from __future__ import annotations

import importlib.util

from edgevl.errors import BackendUnavailable, ConfigError

NOT_INSTALLED = ("torch2trt is not installed (it is not on PyPI). On Jetson install it from source, next to "
                 "JetPack's PyTorch: `git clone https://github.com/NVIDIA-AI-IOT/torch2trt && cd torch2trt && "
                 "python3 setup.py install`; or drop --via torch2trt to build the vision engine from the bundle's ONNX")


def torch2trt_available() -> bool:
    return importlib.util.find_spec("torch2trt") is not None and importlib.util.find_spec("torch") is not None


def check_via_torch2trt(bundle, job, tensorrt_version: str) -> None:
    """Raise before anything is written when --via torch2trt cannot work here."""
    from edgevl.exporters.compile.trt_plan import parse_version

    if job is None:
        raise ConfigError("--via torch2trt converts the vision part, which is not among the parts being compiled")
    if not torch2trt_available():
        raise BackendUnavailable(NOT_INSTALLED)
    if job.plan.precision == "int8":
        raise ConfigError("--via torch2trt builds FP32/FP16 engines only (its INT8 mode is implicit calibration); "
                          "compile the Q/DQ bundle without --via for INT8")
    if job.plan.precision == "fp16" and parse_version(tensorrt_version)[0] >= 11:
        raise ConfigError(f"torch2trt's fp16_mode uses the FP16 builder flag, which TensorRT {tensorrt_version} "
                          "removed; drop --via torch2trt (edgevl converts the ONNX to FP16 for TensorRT 11)")
    if job.plan.dla_core is not None and job.plan.precision == "fp32":
        raise ConfigError("DLA runs only FP16 or INT8")
    source = bundle.manifest.get("model", {}).get("source")
    if not source:
        raise ConfigError("--via torch2trt needs the checkpoint, and this bundle's manifest has no model.source")


def build_vision_engine(bundle, job, prepared, log=print) -> bytes:
    import torch
    from torch2trt import torch2trt

    from edgevl.exporters.export import load_exportable

    trt = prepared.trt
    vlm = load_exportable(bundle.manifest["model"]["source"])
    module = vlm.vision.cuda().eval()
    ranges = job.profiles[0].shapes.get("pixel_values") if job.profiles else None
    kwargs = {}
    if ranges:          # dynamic batch: the same min/opt/max as the ONNX build would use
        lo, opt, hi = ranges
        kwargs.update(min_shapes=[tuple(lo)], opt_shapes=[tuple(opt)], max_shapes=[tuple(hi)])
    example = torch.zeros(tuple(ranges[1]) if ranges else (1, *vlm.pixel_shape), device="cuda")
    if job.plan.dla_core is not None:
        kwargs.update(default_device_type=trt.DeviceType.DLA, dla_core=job.plan.dla_core, gpu_fallback=True)
    with torch.no_grad():
        converted = torch2trt(module, [example], input_names=["pixel_values"], output_names=["image_embeds"],
                              fp16_mode=job.plan.precision == "fp16",
                              max_workspace_size=int(prepared.options["workspace_mb"]) << 20, **kwargs)
    log(f"           torch2trt converted {type(vlm.vision).__name__} ({job.plan.precision})")
    return bytes(memoryview(converted.engine.serialize()))
