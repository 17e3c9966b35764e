"""Bundles: atomic writes, validation, tamper detection, readable info."""

import json
import os

import pytest

from edgevl.bundle import MANIFEST, SCHEMA_VERSION, BundleWriter, describe, load_bundle, writing_bundle
from edgevl.errors import BundleError

from bundle_edits import FAKE_ONNX, minimal_manifest


def _minimal(w: BundleWriter):
    w.file("part.onnx").write_bytes(FAKE_ONNX + b"\x12\x06edgevl")     # ir_version, producer_name
    w.manifest.update(minimal_manifest("part.onnx"))


def test_commit_writes_manifest_with_hashes(tmp_path):
    with writing_bundle(tmp_path / "b") as w:
        _minimal(w)
    b = load_bundle(tmp_path / "b")
    assert b.manifest["schema_version"] == SCHEMA_VERSION
    assert set(b.manifest["files"]) == {"part.onnx"}
    assert b.manifest["files"]["part.onnx"]["bytes"] == len(FAKE_ONNX) + 8


def test_crash_leaves_no_half_bundle(tmp_path):
    with pytest.raises(RuntimeError):
        with writing_bundle(tmp_path / "b") as w:
            _minimal(w)
            raise RuntimeError("simulated crash mid-export")
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir()]  # temp dir cleaned up too


def test_existing_output_refused_unless_forced(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match="already exists.*--force"):
        BundleWriter(tmp_path / "b")
    with writing_bundle(tmp_path / "b", force=True) as w:
        _minimal(w)
    assert load_bundle(tmp_path / "b")


def test_tampered_truncated_and_missing_files_are_named(tmp_path):
    with writing_bundle(tmp_path / "b") as w:
        _minimal(w)
    part = tmp_path / "b" / "part.onnx"
    part.write_bytes(FAKE_ONNX + b"\x12\x06edgevm")  # same size, different content
    with pytest.raises(BundleError, match="part.onnx does not match its sha256"):
        load_bundle(tmp_path / "b")
    part.write_bytes(b"onnx")
    with pytest.raises(BundleError, match="part.onnx has 4 bytes"):
        load_bundle(tmp_path / "b")
    os.remove(part)
    with pytest.raises(BundleError, match="part.onnx listed in the manifest is missing"):
        load_bundle(tmp_path / "b")


def test_newer_schema_is_refused_with_upgrade_hint(tmp_path):
    with writing_bundle(tmp_path / "b") as w:
        _minimal(w)
    m = tmp_path / "b" / MANIFEST
    data = json.loads(m.read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    m.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="newer than this runtime supports.*upgrade edgevl"):
        load_bundle(tmp_path / "b")


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path / "empty")


def test_describe_real_bundle(tiny_bundle):
    text = describe(load_bundle(tiny_bundle))
    assert "edgevl-tiny" in text and "decoder" in text and "sha256 verified" in text
