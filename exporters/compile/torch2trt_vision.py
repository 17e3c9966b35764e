"""``edgevl compile --target tensorrt --via torch2trt``: build the vision engine straight from
PyTorch with torch2trt (NVIDIA-AI-IOT), skipping ONNX. Optional and small.

torch2trt is not on PyPI; Jetson users install it from source next to JetPack's PyTorch. What
its source (torch2trt/torch2trt.py) does decides what edgevl allows:

- it always creates the network with ``1 << EXPLICIT_BATCH``, a flag TensorRT 11 removed, so
  every conversion fails there with AttributeError: ``--via torch2trt`` is TensorRT 10 only;
- ``fp16_mode`` sets the FP16 builder flag and INT8 is implicit calibration, so it serves
  FP32/FP16 engines; INT8 goes through the bundle's Q/DQ ONNX;
- with ``default_device_type=DLA`` it raises ``ValueError('Dataset cannot have multiple shapes
  when using DLA')`` for min != max shapes, so a DLA vision engine gets one static shape
  (the opt shape, like the ONNX path);
- on TensorRT >= 10 it ignores ``max_workspace_size``.

The checkpoint is found through the manifest's ``model.source`` (it must exist on this device).
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
    if parse_version(tensorrt_version)[0] >= 11:
        raise ConfigError(f"--via torch2trt does not work with TensorRT {tensorrt_version}: torch2trt creates every "
                          "network with NetworkDefinitionCreationFlag.EXPLICIT_BATCH (and FP16 with the FP16 builder "
                          "flag), both removed in TensorRT 11; drop --via torch2trt: the ONNX path builds the same "
                          "vision engine (FP16 from an FP16 graph)")
    if not torch2trt_available():
        raise BackendUnavailable(NOT_INSTALLED)
    if job.plan.precision == "int8":
        raise ConfigError("--via torch2trt builds FP32/FP16 engines only (its INT8 mode is implicit calibration); "
                          "compile the Q/DQ bundle without --via for INT8")
    if job.plan.dla_core is not None and job.plan.precision == "fp32":
        raise ConfigError("DLA runs only FP16 or INT8")
    source = bundle.manifest.get("model", {}).get("source")
    if not source:
        raise ConfigError("--via torch2trt needs the checkpoint, and this bundle's manifest has no model.source")


def torch2trt_arguments(job, pixel_shape: tuple, trt) -> tuple[tuple, dict]:
    """The example input's shape and the shape/DLA keyword arguments for ``torch2trt(...)``.
    GPU: the same dynamic batch range as the ONNX build. DLA: one static shape (torch2trt
    refuses min != max with DLA), the profile's opt shape."""
    ranges = job.profiles[0].shapes.get("pixel_values") if job.profiles else None
    if job.plan.dla_core is not None:
        shape = tuple(ranges[1]) if ranges else (1, *pixel_shape)
        return shape, {"default_device_type": trt.DeviceType.DLA, "dla_core": int(job.plan.dla_core),
                       "gpu_fallback": True}
    if not ranges:
        return (1, *pixel_shape), {}
    lo, opt, hi = ranges
    return tuple(opt), {"min_shapes": [tuple(lo)], "opt_shapes": [tuple(opt)], "max_shapes": [tuple(hi)]}


def build_vision_engine(bundle, job, prepared, log=print) -> bytes:
    import torch
    from torch2trt import torch2trt

    from edgevl.exporters.export import load_exportable

    vlm = load_exportable(bundle.manifest["model"]["source"])
    module = vlm.vision.cuda().eval()
    shape, kwargs = torch2trt_arguments(job, tuple(vlm.pixel_shape), prepared.trt)
    example = torch.zeros(shape, device="cuda")
    with torch.no_grad():
        converted = torch2trt(module, [example], input_names=["pixel_values"], output_names=["image_embeds"],
                              fp16_mode=job.plan.precision == "fp16",
                              max_workspace_size=int(prepared.options["workspace_mb"]) << 20, **kwargs)
    log(f"           torch2trt converted {type(vlm.vision).__name__} ({job.plan.precision}"
        f"{', DLA core %d, static shape %s' % (job.plan.dla_core, shape) if job.plan.dla_core is not None else ''})")
    return bytes(memoryview(converted.engine.serialize()))
