"""Export of edgevl-tiny: parity report, greedy identity, clear errors on bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import BACKENDS, needs_torch

pytestmark = needs_torch


def test_parity_report_within_tolerance(tiny_bundle):
    report = json.loads((tiny_bundle / "parity.json").read_text())
    parts = {p["part"]: p for p in report["parts"]}
    assert set(parts) == {"vision", "embed", "decoder"}
    for part in parts.values():
        assert part["passed"]
        for out in part["outputs"]:
            assert out["max_abs"] <= 1e-4 and out["cosine"] > 0.9999
    assert report["greedy"] and all(g["match"] for g in report["greedy"])
    assert all(len(g["pytorch"]) > 0 for g in report["greedy"])


def test_manifest_describes_parts(tiny_bundle):
    from edgevl.bundle import load_bundle

    m = load_bundle(tiny_bundle).manifest
    dec = m["parts"]["decoder"]
    names = [t["name"] for t in dec["inputs"]]
    assert names[:2] == ["inputs_embeds", "past_len"] and "past_key.0" in names
    assert dec["inputs"][2]["shape"][0] == "batch" and dec["inputs"][2]["shape"][2] == "capacity"
    assert m["preprocess"]["size"] == [64, 64] and m["prompt"]["image_seq_len"] == 16
    assert m["provenance"]["opset"] == 17 and m["tokenizer"]["eos_token_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_bundle_answers_exactly_like_pytorch_on_200_scenes(tiny_bundle, tiny_torch, backend):
    import edgevl
    from edgevl.evaluate import evaluate
    from edgevl.models.reference import TorchAnswerer

    model, tok = tiny_torch
    ref = evaluate(TorchAnswerer(model, tok), n=200, keep_answers=True)
    vlm = edgevl.load(tiny_bundle, backend=backend, verbose=False)
    got = evaluate(vlm.answer, n=200, keep_answers=True)
    mismatches = [(a, b) for a, b in zip(ref["answers"], got["answers"]) if a["answer"] != b["answer"]]
    assert not mismatches, mismatches[:3]
    assert got["accuracy"] == ref["accuracy"]


def test_unsupported_architecture_lists_supported(tmp_path):
    from edgevl.errors import UnsupportedArchitecture
    from edgevl.exporters.export import export_model

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"architectures": ["WhisperForConditionalGeneration"]}))
    with pytest.raises(UnsupportedArchitecture, match="WhisperForConditionalGeneration.*supported: .*EdgeVLTiny"):
        export_model(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_missing_files(tmp_path):
    from edgevl.errors import CheckpointError
    from edgevl.exporters.export import export_model
    from edgevl.models.checkpoint import EMBEDDED_DIR

    ckpt = tmp_path / "ckpt"
    shutil.copytree(EMBEDDED_DIR, ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        export_model(ckpt, tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a directory and not a built-in model"):
        export_model(tmp_path / "nowhere", tmp_path / "out")


def test_existing_output_needs_force(tiny_bundle, tmp_path):
    from edgevl.errors import BundleError
    from edgevl.exporters.export import export_model

    (tmp_path / "out").mkdir()
    with pytest.raises(BundleError, match="already exists.*--force"):
        export_model("edgevl-tiny", tmp_path / "out", log=lambda *a: None)


def test_op_that_cannot_be_lowered_is_named(tmp_path):
    import torch

    from edgevl.errors import ExportError
    from edgevl.exporters.onnx_export import _export

    class Eig(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x).real

    with pytest.raises(ExportError, match="part 'vision'.*aten::linalg_eigvals.*opset 17"):
        _export(Eig(), (torch.randn(2, 3, 3),), tmp_path / "x.onnx", ["x"], ["y"], {}, "vision")


def test_parity_failure_names_part_output_and_numbers():
    from edgevl.errors import ParityError
    from edgevl.runtimes.compare import Comparator, FnRunner

    ref = FnRunner(lambda f: {"logits": np.ones(4, np.float32)}, "pytorch")
    bad = FnRunner(lambda f: {"logits": np.array([1, 1, 1, 1.5], np.float32)}, "onnxruntime")
    report = Comparator(atol=1e-4).compare("decoder", ref, bad, [{}])
    with pytest.raises(ParityError, match="part 'decoder'.*output 'logits': max abs diff 0.5.*cosine"):
        Comparator.require(report)


def test_cli_export_and_info(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "edgevl.cli.main", "export", "--model", "edgevl-tiny", "--out",
                          str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "greedy tokens: 3/3" in out.stdout and "peak memory" in out.stdout
    info = subprocess.run([sys.executable, "-m", "edgevl.cli.main", "info", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "sha256 verified" in info.stdout
    again = subprocess.run([sys.executable, "-m", "edgevl.cli.main", "export", "--model", "edgevl-tiny", "--out",
                            str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "--force" in again.stderr
