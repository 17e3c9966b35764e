"""Safe install on a device: atomic switch, rollback, a failing smoke test or an untrusted bundle
keeps the active version, and an install killed at random points or out of disk space never
leaves a half-copied active model."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgevl
from edgevl.bundle import load_bundle
from edgevl.errors import BundleError
from edgevl.install import install, installed_versions, rollback
from edgevl.signing import keygen, sign_bundle

from bundle_edits import copy_bundle, reseal
from conftest import has_module

needs_onnx = pytest.mark.skipif(not has_module("onnx"), reason="building the broken test graph needs onnx (export extra)")
QUIET = dict(log=lambda *a: None)


def _variant(tiny_bundle, dst: Path, max_new_tokens: int) -> Path:
    """A copy of the tiny bundle with a different manifest, hence a different version id."""
    copy_bundle(tiny_bundle, dst)
    reseal(dst, lambda m: m["generation"].update(max_new_tokens=max_new_tokens))
    return dst


@pytest.fixture
def two_versions(tiny_bundle, tmp_path):
    return _variant(tiny_bundle, tmp_path / "v1", 20), _variant(tiny_bundle, tmp_path / "v2", 21)


def _active_max_new_tokens(models: Path) -> int:
    return load_bundle(models / "tiny" / "current").manifest["generation"]["max_new_tokens"]


def test_install_switches_keeps_previous_and_rolls_back(two_versions, tmp_path):
    v1, v2 = two_versions
    models = tmp_path / "models"
    first = install(v1, models, name="tiny", **QUIET)
    assert first.changed and first.previous is None and _active_max_new_tokens(models) == 20
    second = install(v2, models, name="tiny", **QUIET)
    assert second.previous == first.version and _active_max_new_tokens(models) == 21
    assert not install(v2, models, name="tiny", **QUIET).changed          # same bundle again: nothing to do
    with edgevl.load(models / "tiny" / "current", verbose=False) as vlm:
        assert vlm.generate(None, "what shape?", max_new_tokens=2).tokens
    back = rollback(models, "tiny", **QUIET)
    assert back.version == first.version and _active_max_new_tokens(models) == 20
    assert installed_versions(models, "tiny") == {"current": first.version, "previous": second.version,
                                                  "versions": sorted([first.version, second.version])}
    rollback(models, "tiny", **QUIET)                                      # and forward again
    assert _active_max_new_tokens(models) == 21


def _nan_vision(path: Path) -> None:
    """A vision part of the right interface whose embeddings are all NaN (like an FP16 overflow)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Shape", ["pixel_values"], ["shape"], start=0, end=1),
             helper.make_node("Constant", [], ["tail"], value=helper.make_tensor("t", TensorProto.INT64, [2], [16, 192])),
             helper.make_node("Concat", ["shape", "tail"], ["out_shape"], axis=0),
             helper.make_node("ConstantOfShape", ["out_shape"], ["image_embeds"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [float("nan")]))]
    graph = helper.make_graph(nodes, "nan_vision",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 64, 64])],
                              [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", 16, 192])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@needs_onnx
def test_failing_smoke_test_keeps_the_previous_version(two_versions, tmp_path):
    v1, v2 = two_versions
    models = tmp_path / "models"
    install(v1, models, name="tiny", **QUIET)
    _nan_vision(v2 / "vision.onnx")
    reseal(v2)
    load_bundle(v2)                                          # hashes and containment are fine: only running shows it
    with pytest.raises(BundleError, match="smoke test on onnxruntime: the vision part returned non-finite"):
        install(v2, models, name="tiny", backend="onnxruntime", **QUIET)
    state = installed_versions(models, "tiny")
    assert state["previous"] is None and len(state["versions"]) == 1 and _active_max_new_tokens(models) == 20
    assert not list((models / "tiny").glob(".incoming-*"))


def test_untrusted_bundle_is_not_installed(two_versions, tmp_path):
    v1, v2 = two_versions
    private, public, _ = keygen(tmp_path / "k.key")
    sign_bundle(v1, private)
    models = tmp_path / "models"
    install(v1, models, name="tiny", trust=[public], **QUIET)
    with pytest.raises(BundleError, match="is not signed"):
        install(v2, models, name="tiny", trust=[public], **QUIET)
    assert _active_max_new_tokens(models) == 20
    assert not list((models / "tiny").glob(".incoming-*"))


def _install_cmd(bundle: Path, models: Path) -> list[str]:
    return [sys.executable, "-m", "edgevl.cli.main", "install", str(bundle), "--into", str(models), "--name", "tiny"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}


def test_install_killed_at_random_points_leaves_a_loadable_active_version(two_versions, tmp_path):
    """Kill (SIGKILL) the installing process right after a random stage line plus a random delay;
    afterwards the active version is whole: the old one unless the switch already happened."""
    v1, v2 = two_versions
    models = tmp_path / "models"
    install(v1, models, name="tiny", **QUIET)
    rng = random.Random(19)
    stages = ["copying", "verifying", "smoke test", "copying", "verifying"]
    interrupted = 0                                         # kills that left a partial copy behind
    for stage in stages:
        child = subprocess.Popen(_install_cmd(v2, models), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 env=_env(), text=True)
        seen = []
        for line in child.stderr:
            seen.append(line)
            if stage in line:
                time.sleep(rng.uniform(0, 0.05))
                break
        child.kill()
        child.wait()
        child.stderr.close()
        assert any(stage in line for line in seen), f"the install never reached {stage!r}: {seen}"
        active = _active_max_new_tokens(models)             # loads and verifies every file of the active version
        assert active in (20, 21)                           # the old one, or the new one if the switch happened
        interrupted += bool(list((models / "tiny").glob(".incoming-*")))
        if active == 21:                                    # killed just after the switch: go back for the next try
            rollback(models, "tiny", **QUIET)
        with edgevl.load(models / "tiny" / "current", verbose=False) as vlm:
            assert vlm.generate(None, "what shape?", max_new_tokens=1).tokens
    assert interrupted >= 1, "no kill landed while the copy was in progress"
    assert _active_max_new_tokens(models) == 20
    done = install(v2, models, name="tiny", **QUIET)        # an uninterrupted install cleans up and succeeds
    assert done.changed and _active_max_new_tokens(models) == 21
    assert not list((models / "tiny").glob(".incoming-*"))


def _small_file_limit():
    """In the child: writes past 1 MB fail with EFBIG, as they would with ENOSPC on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_full_disk_during_copy_keeps_the_active_version(two_versions, tmp_path):
    v1, v2 = two_versions
    models = tmp_path / "models"
    install(v1, models, name="tiny", **QUIET)
    run = subprocess.run(_install_cmd(v2, models), capture_output=True, text=True, env=_env(),
                         preexec_fn=_small_file_limit, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "could not copy the bundle" in run.stderr and "disk is full" in run.stderr
    assert "The active version" in run.stderr and "is unchanged" in run.stderr
    assert _active_max_new_tokens(models) == 20
    assert not list((models / "tiny").glob(".incoming-*"))
