"""Property-based fuzzing (Hypothesis): manifests, ONNX files, images and prompts. Every input is
either served or refused with an EdgeVLError; never another exception, a crash or a hang.

Bounded for `make test`: a fixed number of examples per property, derandomized (the same inputs
every run, so a failure reproduces), no example database written into the tree.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="fuzz tests need hypothesis (the dev extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import edgevl  # noqa: E402
from edgevl.bundle import MANIFEST, load_bundle  # noqa: E402
from edgevl.errors import EdgeVLError  # noqa: E402
from edgevl.onnx_refs import external_data_locations  # noqa: E402
from edgevl.preprocess import preprocess  # noqa: E402

from bundle_edits import copy_bundle, reseal  # noqa: E402


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
                      st.floats(allow_nan=True, allow_infinity=True),
                      st.sampled_from(["", "..", "../x.onnx", "/etc/passwd", "decoder.onnx", "a\x00b", "float16",
                                       "{prompt}", "<image>" * 3, "x" * 70000]),
                      st.text(max_size=20))
JSON = st.recursive(JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)


def _paths(node, prefix=()):
    """Every (path) into a JSON value, containers included."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_manifests(draw, base: dict):
    """The real manifest with 1-3 values (anywhere, files and parts included) replaced or deleted."""
    m = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(m)))          # each section equally likely, not each leaf
        paths = [p for p in _paths(m[section], (section,))]
        path = draw(st.sampled_from(paths))
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        old = parent[path[-1]]
        action = draw(st.sampled_from(["delete", "replace", "nudge"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "nudge" and isinstance(old, int) and not isinstance(old, bool):
            parent[path[-1]] = draw(st.sampled_from([0, 1, -1, old + 1, old - 1, old * 2, old * 1000, 1 << 31]))
        elif action == "nudge" and isinstance(old, str):
            parent[path[-1]] = draw(st.sampled_from([old + "x", old.upper(), "", "../" + old, "/" + old]))
        else:
            parent[path[-1]] = draw(JSON)
    return m


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle, tmp_path_factory):
    return copy_bundle(tiny_bundle, tmp_path_factory.mktemp("fuzz") / "b")


@pytest.fixture(scope="module")
def vlm(tiny_bundle):
    with edgevl.load(tiny_bundle, backend="onnxruntime", verbose=False) as v:
        yield v


def test_fuzz_manifests_are_served_or_refused(fuzz_bundle, tiny_bundle):
    base = json.loads((tiny_bundle / MANIFEST).read_text())
    outcomes = {"served": 0, "refused": 0}

    @fuzz(40)
    @given(mutated_manifests(base), st.booleans())
    def check(manifest, recompute_hashes):
        (fuzz_bundle / MANIFEST).write_text(json.dumps(manifest))
        if recompute_hashes and isinstance(manifest.get("files"), dict):
            try:
                reseal(fuzz_bundle)
            except (TypeError, AttributeError, KeyError, ValueError, OSError):
                pass                      # a manifest too broken for the test's helper is still fed as is
        try:
            with edgevl.load(fuzz_bundle, backend="onnxruntime", verbose=False) as v:
                v.generate(np.zeros((8, 8, 3), np.uint8), "what?", max_new_tokens=2)
            outcomes["served"] += 1
        except EdgeVLError:
            outcomes["refused"] += 1

    check()
    assert outcomes["refused"] > 0 and outcomes["served"] > 0 and sum(outcomes.values()) == 40


@st.composite
def damaged_onnx(draw, data: bytes):
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(buf) - 1))
        buf[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        buf = buf[:draw(st.integers(0, len(buf)))]
    return bytes(buf)


def test_fuzz_onnx_files_are_loaded_or_refused(tiny_bundle, tmp_path):
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    original = (tiny_bundle / "embed.onnx").read_bytes()
    path = tmp_path / "part.onnx"
    outcomes = {"served": 0, "refused": 0}

    @fuzz(40)
    @given(damaged_onnx(original))
    def check(data):
        path.write_bytes(data)
        try:
            external_data_locations(path)
            with OnnxRuntimeRunner(path, threads=1) as runner:
                runner.infer({"input_ids": np.zeros((1, 3), np.int64)}, check=True)
            outcomes["served"] += 1
        except EdgeVLError:
            outcomes["refused"] += 1

    check()
    assert outcomes["refused"] > 0 and outcomes["served"] > 0


IMAGES = st.one_of(
    st.builds(lambda dtype, shape, seed: np.random.default_rng(seed).integers(0, 256, shape).astype(dtype),
              st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.bool_, np.int8, np.float64]),
              st.lists(st.integers(0, 40), min_size=0, max_size=4).map(tuple), st.integers(0, 2 ** 32 - 1)),
    st.sampled_from([None, 3, "no/such/file.png", b"\x89PNG", [], [None], object()]),
)


def test_fuzz_images_are_preprocessed_or_refused(vlm, tmp_path):
    spec = vlm.preprocess_spec

    @fuzz(60)
    @given(IMAGES, st.sampled_from(["bgr", "rgb", "yuv"]), st.binary(max_size=64))
    def check(image, channels, file_bytes):
        try:
            out = preprocess(image, spec, channels)
            assert out.shape[1:] == (3, *spec["size"]) and np.isfinite(out).all()
        except EdgeVLError:
            pass
        garbage = tmp_path / "garbage.png"
        garbage.write_bytes(file_bytes)
        try:
            preprocess(str(garbage), spec)
        except EdgeVLError:
            pass

    check()


def test_fuzz_prompts_are_answered_or_refused(vlm):
    image = np.full((64, 64, 3), 200, np.uint8)

    @fuzz(30)
    @given(st.one_of(st.text(max_size=300), st.sampled_from(["<image>", "{prompt}{image}", "answer:" * 300,
                                                             "\x00\ud7ff\U0010ffff", "a " * 2000])),
           st.sampled_from([1, 3, 600]))
    def check(prompt, max_new_tokens):
        try:
            result = vlm.generate(image, prompt, max_new_tokens=max_new_tokens)
            assert isinstance(result.text, str) and len(result.tokens) <= max_new_tokens   # EOS may come first
        except EdgeVLError:
            pass

    check()
