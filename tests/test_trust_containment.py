"""Containment and bounds: a bundle can only make the runtime open its own, hashed files, and
a manifest cannot ask for unbounded sizes. Each case is refused at load, naming the field."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import edgevl
from edgevl.bundle import load_bundle
from edgevl.cli.main import main as cli
from edgevl.errors import BundleError

from bundle_edits import FAKE_ONNX, copy_bundle, manifest, minimal_manifest, reseal, write_manifest
from conftest import has_module

needs_onnx = pytest.mark.skipif(not has_module("onnx"), reason="building test graphs needs onnx (the export extra)")


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path / "b")


def _set(path: str, value):
    def edit(m):
        keys = path.split(".")
        node = m
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return edit


def test_absolute_part_path_is_refused_and_info_says_so(bundle, tmp_path, capsys):
    outside = tmp_path / "evil.onnx"
    shutil.copy(bundle / "decoder.onnx", outside)
    reseal(bundle, _set("parts.decoder.onnx", str(outside)))
    with pytest.raises(BundleError, match=r"parts\.decoder\.onnx names '.*evil\.onnx', an absolute path"):
        edgevl.load(bundle, verbose=False)
    assert cli(["info", str(bundle)]) == 2                  # the repro: info no longer says "verified"
    err = capsys.readouterr().err
    assert "parts.decoder.onnx" in err and "absolute path" in err


def test_dotdot_part_path_is_refused(bundle, tmp_path):
    shutil.copy(bundle / "decoder.onnx", tmp_path / "x.onnx")
    reseal(bundle, _set("parts.decoder.onnx", "../x.onnx"))
    with pytest.raises(BundleError, match=r"parts\.decoder\.onnx names '\.\./x\.onnx', which climbs out"):
        load_bundle(bundle)


def test_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(bundle / "vision.onnx", outside)
    os.symlink(outside, bundle / "vision.onnx")              # same bytes, so the sha256 still matches
    with pytest.raises(BundleError, match=r"vision\.onnx.*symlink that leads out of the bundle"):
        load_bundle(bundle)


def test_symlink_inside_the_bundle_is_followed(bundle):
    (bundle / "sub").mkdir()
    shutil.move(bundle / "vision.onnx", bundle / "sub" / "vision.onnx")
    os.symlink("sub/vision.onnx", bundle / "vision.onnx")
    reseal(bundle, add=["sub/vision.onnx"])
    b = load_bundle(bundle)
    assert b.part_file("vision") == (bundle / "sub" / "vision.onnx").resolve()


def test_unlisted_file_is_refused(bundle):
    shutil.copy(bundle / "decoder.onnx", bundle / "extra.onnx")
    reseal(bundle, _set("parts.decoder.onnx", "extra.onnx"))
    with pytest.raises(BundleError, match=r"parts\.decoder\.onnx names 'extra\.onnx', which is not listed"):
        load_bundle(bundle)


def test_listed_file_outside_is_refused(bundle, tmp_path):
    (tmp_path / "secret").write_text("x")
    data = manifest(bundle)
    data["files"]["../secret"] = {"sha256": "0" * 64, "bytes": 1}
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match=r"files\['\.\./secret'\] names '\.\./secret'"):
        load_bundle(bundle)


def test_tokenizer_outside_is_refused_and_a_broken_one_is_named(bundle, tmp_path):
    shutil.copy(bundle / "tokenizer.json", tmp_path / "tok.json")
    reseal(bundle, _set("tokenizer.file", "../tok.json"))
    with pytest.raises(BundleError, match=r"tokenizer\.file names '\.\./tok\.json'"):
        edgevl.load(bundle, verbose=False)
    (bundle / "tokenizer.json").write_text('{"not": "a tokenizer"')
    reseal(bundle, _set("tokenizer.file", "tokenizer.json"))
    with pytest.raises(BundleError, match=r"tokenizer file tokenizer\.json .*cannot be read as a tokenizer"):
        edgevl.load(bundle, verbose=False)


def test_report_and_compiled_artefact_paths_are_checked(bundle):
    reseal(bundle, _set("reports.parity", "/etc/passwd"))
    with pytest.raises(BundleError, match=r"reports\.parity names '/etc/passwd'"):
        load_bundle(bundle)
    reseal(bundle, _set("reports.parity", "parity.json"))
    (bundle / "openvino").mkdir()
    (bundle / "openvino" / "vision.xml").write_text("<net/>")
    (bundle / "openvino" / "vision.bin").write_bytes(b"\0" * 8)
    reseal(bundle, _set("parts.vision.artifacts", {"openvino": "openvino/vision.xml"}), add=["openvino/vision.xml"])
    with pytest.raises(BundleError, match=r"parts\.vision\.artifacts\.openvino \(its weights \.bin\) names "
                                          r"'openvino/vision\.bin', which is not listed"):
        load_bundle(bundle)
    (bundle / "trt").mkdir()
    (bundle / "trt" / "decoder.plan").write_bytes(b"plan")
    reseal(bundle, _set("parts.vision.artifacts", {"tensorrt": "trt/decoder.plan"}), add=["trt/decoder.plan"])
    with pytest.raises(BundleError, match=r"artifacts\.tensorrt \(its engine metadata\) names 'trt/decoder\.plan\.json'"):
        load_bundle(bundle)


def _graph_with_external(location: str):
    """y = x + w, w (4 floats) stored externally at ``location``; plus a Constant node whose tensor
    is external too, inside an If subgraph (the walker must look there)."""
    import onnx
    from onnx import TensorProto, helper

    def external(name, loc):
        t = helper.make_tensor(name, TensorProto.FLOAT, [4], [0.0] * 4)
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", loc), ("offset", "0"), ("length", "16")):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        return t

    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=external("c", location))],
                               "branch", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])])
    nodes = [helper.make_node("Add", ["x", "w"], ["s"]),
             helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch),
             helper.make_node("Add", ["s", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              initializer=[external("w", location)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@needs_onnx
def test_external_data_walker_matches_onnx(tmp_path):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from edgevl.onnx_refs import external_data_locations

    model = _graph_with_external("w.data")
    model.graph.initializer[0].external_data[0].value = "other/w2.data"      # a second, distinct location
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    expected = {next(e.value for e in t.external_data if e.key == "location")
                for t in _get_all_tensors(model) if uses_external_data(t)}
    assert set(external_data_locations(tmp_path / "m.onnx")) == expected == {"w.data", "other/w2.data"}


@needs_onnx
def test_external_data_inside_runs_and_outside_or_unlisted_is_refused(tmp_path):
    """The runner really opens the external data (ONNX Runtime), so the check covers what it reads."""
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    def make(location, data_at, listed):
        b = tmp_path / f"b{make.n}"
        make.n += 1
        b.mkdir()
        (b / "part.onnx").write_bytes(_graph_with_external(location).SerializeToString())
        data_at(b).parent.mkdir(parents=True, exist_ok=True)
        data_at(b).write_bytes(np.arange(4, dtype=np.float32).tobytes())
        write_manifest(b, {"format": "edgevl-bundle", "schema_version": 1, "files": {}, **minimal_manifest()})
        reseal(b, add=["part.onnx", *listed])
        return b
    make.n = 0

    ok = load_bundle(make("w.data", lambda b: b / "w.data", ["w.data"]))
    with OnnxRuntimeRunner(ok.part_file("vision")) as runner:
        y = runner.infer({"x": np.ones(4, np.float32), "cond": np.array(True)})["y"]
    np.testing.assert_array_equal(y, 1 + 2 * np.arange(4, dtype=np.float32))
    with pytest.raises(BundleError, match=r"parts\.vision\.onnx \(part\.onnx\) stores tensors in external data at "
                                          r"'\.\./w\.data', outside the bundle"):
        load_bundle(make("../w.data", lambda b: b.parent / "w.data", []))
    with pytest.raises(BundleError, match=r"external data of part\.onnx\) names 'w\.data', which is not listed"):
        load_bundle(make("w.data", lambda b: b / "w.data", []))
    escape = make("link.data", lambda b: b.parent / "real.data", [])
    os.symlink(tmp_path / "real.data", escape / "link.data")
    reseal(escape, add=["link.data"])
    with pytest.raises(BundleError, match=r"'link\.data', a symlink that leads out of the bundle"):
        load_bundle(escape)


@pytest.mark.parametrize("field, value, words", [
    ("decoder.n_layers", 10 ** 9, r"decoder\.n_layers = 1000000000 is outside the allowed range \[1, 1024\]"),
    ("decoder.vocab_size", 1 << 40, r"decoder\.vocab_size = .* outside the allowed range"),
    ("decoder.max_position", 1 << 40, r"decoder\.max_position = .* outside the allowed range"),
    ("decoder.head_dim", "64", r"decoder\.head_dim = '64' is not an integer"),
    ("decoder.kv_dtype", "object", r"decoder\.kv_dtype = 'object' is not one of"),
    ("preprocess.size", [100000, 64], r"preprocess\.size\[0\] = 100000 is outside the allowed range"),
    ("preprocess.std", [0, 1, 1], r"preprocess\.std\[0\] = 0 is outside the allowed range .* nonzero"),
    ("prompt.image_seq_len", 1 << 30, r"prompt\.image_seq_len = .* outside the allowed range"),
    ("prompt.template", "x" * (1 << 17), r"prompt\.template = 'xxx.* is 131072 characters long"),
    ("prompt.template", "no slot", r"prompt\.template = 'no slot' has no \{prompt\} slot"),
    ("generation.max_new_tokens", -1, r"generation\.max_new_tokens = -1 is outside"),
])
def test_manifest_bounds_refuse_oversized_fields(tmp_path, field, value, words):
    b = tmp_path / "b"
    b.mkdir()
    (b / "part.onnx").write_bytes(FAKE_ONNX)
    write_manifest(b, {"format": "edgevl-bundle", "schema_version": 1, "files": {}, **minimal_manifest()})
    reseal(b, add=["part.onnx"])
    load_bundle(b)                                                  # valid as written
    reseal(b, _set(field, value))
    with pytest.raises(BundleError, match=words):
        load_bundle(b)


def test_oversized_or_deeply_nested_manifest_is_refused(tmp_path):
    b = tmp_path / "b"
    b.mkdir()
    (b / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON|format is"):
        load_bundle(b)
    with open(b / "manifest.json", "wb") as f:
        f.truncate((16 << 20) + 1)
    with pytest.raises(BundleError, match="larger than 16 MiB"):
        load_bundle(b)
