"""The on-device runtime: runners (one conformance class), API, errors at load time."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import edgevl
from edgevl.errors import BackendError, BackendUnavailable, BundleError, InputError
from edgevl.runtimes.registry import get_runner_class

from conftest import BACKENDS, HAS_OPENVINO, HAS_TENSORRT


class RunnerConformance:
    """Written once, run for every runner (subclasses set ``backend``)."""

    backend = None

    @pytest.fixture
    def runner(self, tiny_bundle):
        from edgevl.bundle import load_bundle

        cls = get_runner_class(self.backend)
        r = cls(load_bundle(tiny_bundle).part_file("vision", self.backend), threads=1)
        yield r
        r.close()

    def test_lazy_activation_and_description(self, runner):
        assert not runner.active
        names = runner.input_names          # activates
        assert runner.active and names == ["pixel_values"]
        (info,) = runner.inputs
        assert info.dtype == "float32" and info.shape[1:] == (3, 64, 64)
        assert runner.output_names == ["image_embeds"]

    def test_infer_shapes_and_timing(self, runner):
        x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
        out = runner.infer({"pixel_values": x})
        assert out["image_embeds"].shape[0] == 3 and np.isfinite(out["image_embeds"]).all()
        assert runner.last_infer_ms > 0 and runner.load_ms > 0

    def test_checked_feeds_give_clear_errors(self, runner):
        with pytest.raises(InputError, match="dtype float64, expected float32"):
            runner.infer({"pixel_values": np.zeros((1, 3, 64, 64))}, check=True)
        with pytest.raises(InputError, match=r"shape \(1, 3, 32, 32\)"):
            runner.infer({"pixel_values": np.zeros((1, 3, 32, 32), np.float32)}, check=True)
        with pytest.raises(InputError, match="missing \\['pixel_values'\\]"):
            runner.infer({"pixels": np.zeros((1, 3, 64, 64), np.float32)}, check=True)

    def test_close_and_reactivate(self, runner):
        runner.activate()
        runner.close()
        assert not runner.active
        assert runner.infer({"pixel_values": np.zeros((1, 3, 64, 64), np.float32)})["image_embeds"].shape[0] == 1


class TestOnnxRuntimeRunner(RunnerConformance):
    backend = "onnxruntime"


@pytest.mark.skipif(not HAS_OPENVINO, reason="needs OpenVINO: pip install edgevl[openvino]")
class TestOpenVINORunner(RunnerConformance):
    backend = "openvino"

    def test_fp32_bundle_runs_f32_not_bf16(self, runner):
        assert "f32" in runner.execution_precision.lower() or "float32" in runner.execution_precision.lower()


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_generate_stream_encode(tiny_bundle, backend):
    from edgevl.data.world import make_scene

    image = make_scene("test", 1).image()
    vlm = edgevl.load(tiny_bundle, backend=backend, verbose=False)
    result = vlm.generate(image, "describe the image.", channels="rgb")
    assert result.text and result.tokens
    for stage in ("preprocess", "vision", "prefill", "decode_per_token", "total"):
        assert stage in result.timings_ms
    streamed = "".join(vlm.stream(image, "describe the image.", channels="rgb"))
    assert streamed.strip() == result.text
    emb = vlm.encode_images([image, image], channels="rgb")
    assert emb.shape[:2] == (2, 16)
    sampled = [vlm.generate(image, "describe the image.", channels="rgb", temperature=1.0, top_k=5, top_p=0.9,
                            seed=7).tokens for _ in range(2)]
    assert sampled[0] == sampled[1]
    capped = vlm.generate(image, "describe the image.", channels="rgb", max_new_tokens=2)
    assert len(capped.tokens) <= 2
    vlm.close()


def test_backend_picked_and_said(tiny_bundle, capsys):
    vlm = edgevl.load(tiny_bundle)
    assert vlm.backend in BACKENDS
    assert f"using backend {vlm.backend}" in capsys.readouterr().err


def test_prompt_longer_than_context(tiny_bundle):
    vlm = edgevl.load(tiny_bundle, backend="onnxruntime", verbose=False)
    from edgevl.data.world import make_scene

    with pytest.raises(InputError, match="context is 512 tokens"):
        vlm.generate(make_scene("test", 0).image(), "count " * 600, channels="rgb")


def test_undecodable_image_names_the_file(tiny_bundle, tmp_path):
    bad = tmp_path / "camera.jpg"
    bad.write_bytes(b"not a jpeg")
    vlm = edgevl.load(tiny_bundle, backend="onnxruntime", verbose=False)
    with pytest.raises(InputError, match="camera.jpg cannot be decoded"):
        vlm.generate(str(bad), "describe the image.")


def test_a_backend_returning_no_image_embeddings_is_named(tiny_bundle, monkeypatch):
    # OpenVINO on an emulated Cortex-A57 returned (1, 0, D) for a Q/DQ INT8 encoder (section 11)
    vlm = edgevl.load(tiny_bundle, backend="onnxruntime", verbose=False)
    runner = vlm.engine.runners["vision"]
    real = runner.infer
    monkeypatch.setattr(runner, "infer", lambda feeds, **kw: {"image_embeds": real(feeds)["image_embeds"][:, :0]})
    from edgevl.data.world import make_scene

    with pytest.raises(BackendError, match=r"onnxruntime: the vision part returned image_embeds of shape "
                                           r"\(1, 0, \d+\) for 1 image\(s\); expected \(1, 16, D\).*another backend"):
        vlm.generate(make_scene("test", 0).image(), "describe the image.", channels="rgb")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here, so it cannot be missing")
def test_backend_not_installed_names_the_extra(tiny_bundle):
    with pytest.raises(BackendUnavailable, match=r"pip install edgevl\[tensorrt\]"):
        edgevl.load(tiny_bundle, backend="tensorrt")


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(BackendUnavailable, match="unknown backend 'tpu'; available: onnxruntime, openvino, tensorrt"):
        get_runner_class("tpu")


def test_tampered_bundle_refused_at_load(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "decoder.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="decoder.onnx does not match its sha256"):
        edgevl.load(copy, backend="onnxruntime")


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'onnx', 'onnxscript', 'nncf'} or name.startswith('edgevl.exporters'):
            raise ImportError('blocked on-device import: ' + name)
sys.meta_path.insert(0, Block())
import edgevl
from edgevl.data.world import make_scene
vlm = edgevl.load(sys.argv[1], backend=sys.argv[2], verbose=False)
print(vlm.generate(make_scene('test', 3).image(), 'how many shapes are there?', channels='rgb').text)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_needs_no_torch(tiny_bundle, backend):
    out = subprocess.run([sys.executable, "-c", BLOCKER, str(tiny_bundle), backend], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_cli_run_json(tiny_bundle, tmp_path):
    from PIL import Image

    from edgevl.data.world import make_scene

    path = tmp_path / "scene.png"
    Image.fromarray(make_scene("test", 4).image()).save(path)
    out = subprocess.run([sys.executable, "-m", "edgevl.cli.main", "run", str(tiny_bundle), "--image", str(path),
                          "--prompt", "how many shapes are there?", "--backend", "onnxruntime", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["text"] and {"vision", "prefill", "total"} <= set(data["timings_ms"])


def test_batching_gives_the_decoder_half_the_cores_and_threads_can_be_set_per_part(tiny_bundle):
    from edgevl.api import half_the_cores
    from edgevl.data.world import make_scene

    with edgevl.load(tiny_bundle, backend="onnxruntime", batching=True, verbose=False) as vlm:
        threads = {name: r.threads for name, r in vlm.engine.runners.items()}
        assert threads == {"vision": None, "embed": half_the_cores(), "decoder": half_the_cores()}
        assert vlm.generate(make_scene("test", 1).image(), "describe the image.", channels="rgb").text
    with edgevl.load(tiny_bundle, backend="onnxruntime", threads={"vision": 1}, verbose=False) as vlm:
        assert {name: r.threads for name, r in vlm.engine.runners.items()} == {"vision": 1, "embed": None,
                                                                            "decoder": None}
        assert vlm.engine.runners["vision"].session.get_session_options().intra_op_num_threads == 1
