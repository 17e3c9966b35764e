"""Shared fixtures and capability probes. A test that needs something absent skips and says why."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")   # nncf's JIT build can pass 60 s on 2 cores
# Tests never read or write the user's caches (FP32 exports, measured candidates): one per session.
_CACHE = tempfile.mkdtemp(prefix="edgevl-test-cache-")
os.environ["EDGEVL_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


HAS_TORCH = has_module("torch")
HAS_OPENVINO = has_module("openvino")
HAS_CV2 = has_module("cv2")
HAS_TENSORRT = has_module("tensorrt")

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs the export extra (torch): pip install edgevl[export]")
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="needs OpenVINO: pip install edgevl[openvino]")
needs_cv2 = pytest.mark.skipif(not HAS_CV2, reason="needs OpenCV: pip install edgevl[camera]")

BACKENDS = ["onnxruntime"] + (["openvino"] if HAS_OPENVINO else [])


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """An FP32 bundle of the embedded edgevl-tiny, exported once per test session."""
    if not HAS_TORCH:
        pytest.skip("exporting needs the export extra (torch)")
    from edgevl.exporters.export import export_model

    out = tmp_path_factory.mktemp("bundles") / "tiny-fp32"
    export_model("edgevl-tiny", out, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def tiny_torch():
    if not HAS_TORCH:
        pytest.skip("needs torch")
    from edgevl.models.checkpoint import load_checkpoint

    return load_checkpoint("edgevl-tiny")
