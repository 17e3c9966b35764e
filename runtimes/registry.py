"""Backends by name, as lazy import paths, so ``import edgevl`` needs none of them installed.

``get_runner_class("openvino")`` imports the backend module only when asked, and a backend
whose library is missing raises BackendUnavailable naming the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from edgevl.errors import BackendUnavailable


@dataclass(frozen=True)
class BackendInfo:
    name: str
    runner: str            # "module:Class"
    requires: tuple        # importable modules the backend needs
    extra: str             # pip extra that installs them
    devices: str           # what it runs on, for messages


BACKENDS: dict[str, BackendInfo] = {
    "onnxruntime": BackendInfo("onnxruntime", "edgevl.runtimes.onnxruntime:OnnxRuntimeRunner",
                               ("onnxruntime",), "edgevl (core dependency)", "CPU x86/ARM; CUDA/TensorRT EPs when present"),
    "openvino": BackendInfo("openvino", "edgevl.runtimes.openvino:OpenVINORunner",
                            ("openvino",), "edgevl[openvino]", "Intel CPU/GPU/NPU (AUTO)"),
    "tensorrt": BackendInfo("tensorrt", "edgevl.runtimes.tensorrt:TensorRTRunner",
                            ("tensorrt",), "edgevl[tensorrt]", "NVIDIA GPUs and Jetson"),
}


def _missing_modules(info: BackendInfo) -> list[str]:
    return [m for m in info.requires if importlib.util.find_spec(m) is None]


def is_installed(name: str) -> bool:
    return name in BACKENDS and not _missing_modules(BACKENDS[name])


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if is_installed(name)]


def get_runner_class(name: str):
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    info = BACKENDS[name]
    missing = _missing_modules(info)
    if missing:
        raise BackendUnavailable(f"backend {name!r} needs {', '.join(missing)}, which is not installed; "
                                 f"install it with `pip install {info.extra}`")
    module_name, cls_name = info.runner.split(":")
    return getattr(importlib.import_module(module_name), cls_name)
