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


def test_parts_called_once_per_request_give_their_memory_back_and_answer_the_same(tiny_bundle):
    """Vision (and a prefill graph) run without ORT's memory pattern and release their arena after
    each run; the decoder keeps both. The greedy answer is the one the default settings give."""
    from edgevl.data.world import make_scene

    image = make_scene("test", 3).image()
    with edgevl.load(tiny_bundle, backend="onnxruntime", verbose=False) as vlm:
        runners = vlm.engine.runners
        vision = runners["vision"]
        assert not vision.session.get_session_options().enable_mem_pattern
        assert vision._run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
        assert runners["decoder"].session.get_session_options().enable_mem_pattern
        assert runners["decoder"]._run_options is None
        tuned = [vlm.generate(image, "describe the image.", channels="rgb").tokens for _ in range(2)]
    defaults = {"memory_pattern": True, "release_memory": False, "spinning": True}
    with edgevl.load(tiny_bundle, backend="onnxruntime", options=defaults, verbose=False) as vlm:
        assert vlm.engine.runners["vision"].session.get_session_options().enable_mem_pattern
        plain = vlm.generate(image, "describe the image.", channels="rgb").tokens
    assert tuned[0] == tuned[1] == plain


@pytest.mark.skipif(not HAS_OPENVINO, reason="needs OpenVINO: pip install edgevl[openvino]")
def test_openvino_decode_steps_run_on_the_static_step_model_with_the_same_results(tiny_bundle):
    """Single-sequence decode steps go to the batch-1, one-token compiled model; prefill and
    batched steps to the general one; both give the same numbers and the same greedy answer."""
    from edgevl.bundle import load_bundle
    from edgevl.data.world import make_scene
    from edgevl.runtimes.openvino import OpenVINORunner

    path = load_bundle(tiny_bundle).part_file("decoder", "openvino")
    on, off = OpenVINORunner(path, threads=1, options={"static_step": True}), \
        OpenVINORunner(path, threads=1, options={"static_step": False})
    assert on.has_static_step and not off.has_static_step
    rng = np.random.default_rng(0)
    dims = {t.name: t.shape for t in on.inputs}
    kv, dh = dims["past_key.0"][1], dims["past_key.0"][3]
    d = dims["inputs_embeds"][2]

    def feeds(b, t, cap=64, past=5):
        f = {"inputs_embeds": rng.standard_normal((b, t, d)).astype(np.float32),
             "past_len": np.full(b, past, np.int64)}
        for name in dims:
            if name.startswith(("past_key", "past_value")):
                f[name] = rng.standard_normal((b, kv, cap, dh)).astype(np.float32)
        return f

    for b, t, step in ((1, 1, True), (1, 7, False), (3, 1, False)):
        f = feeds(b, t)
        before = on.step_calls
        got, want = on.infer(f), off.infer(f)
        assert on.step_calls == before + step
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)
    # a strided (non-contiguous) feed gives the same numbers as its contiguous copy
    f = feeds(1, 1)
    strided = np.zeros((1, 1, 2 * d), np.float32)
    strided[..., ::2] = f["inputs_embeds"]
    got = on.infer({**f, "inputs_embeds": strided[..., ::2]})
    want = on.infer(f)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    on.close()
    off.close()

    image = make_scene("test", 3).image()
    answers = {}
    for setting in (True, False):
        with edgevl.load(tiny_bundle, backend="openvino", options={"static_step": setting}, verbose=False) as vlm:
            dec = vlm.engine.runners["decoder"]
            answers[setting] = vlm.generate(image, "describe the image.", channels="rgb").tokens
            assert dec.has_static_step == setting and (dec.step_calls > 0) == setting
    assert answers[True] == answers[False] and len(answers[True]) > 1


def test_openvino_static_step_policy():
    from edgevl.errors import ConfigError
    from edgevl.runtimes.openvino import want_static_step

    gib = 1 << 30
    assert want_static_step("auto", 500 << 20, 24 * gib)             # a 500 MB decoder, 24 GB free
    assert not want_static_step("auto", 2 * gib, 8 * gib)             # its copy would take a quarter
    assert not want_static_step("auto", 1 << 20, None)                # memory unknown (or not a CPU)
    assert want_static_step(True, 2 * gib, None) and not want_static_step(False, 1, 24 * gib)
    with pytest.raises(ConfigError, match="static_step='yes'"):
        want_static_step("yes", 1, 1)
