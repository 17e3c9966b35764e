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


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    """edgevl-tiny loaded in-process without batching: the answers the serving paths must equal."""
    import edgevl

    v = edgevl.load(tiny_bundle, backend="onnxruntime", verbose=False)
    yield v
    v.close()


@pytest.fixture(scope="session")
def tiny_torch():
    if not HAS_TORCH:
        pytest.skip("needs torch")
    from edgevl.models.checkpoint import load_checkpoint

    return load_checkpoint("edgevl-tiny")


def batched_and_alone(vlm, requests, params):
    """Submit every (ids, pixels or None) request at once to ``vlm``'s in-flight scheduler, each
    from its own thread, then generate each alone; -> (tokens batched, tokens alone, the
    scheduler's metrics). In-flight batching is exact when the two lists are equal."""
    import threading

    from edgevl.runtimes.generation import stream_tokens

    results: dict[int, list] = {}

    def submit(i):
        results[i] = vlm.scheduler.submit(requests[i][0], requests[i][1], params[i]).result(60)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(requests))]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    stats = vlm.metrics()["scheduler"]
    engine = vlm.engine
    alone = [list(stream_tokens(engine, ids, None if px is None else engine.encode_images(px), p))
             for (ids, px), p in zip(requests, params)]
    return [results.get(i) for i in range(len(requests))], alone, stats
