"""QAT with NNCF: a few steps give a loadable Q/DQ bundle; with a real budget, QAT >= PTQ."""

from __future__ import annotations

import os

import pytest

from conftest import HAS_TORCH

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAS_TORCH, reason="needs the export extra (torch, nncf, torchao)")]


@pytest.fixture(scope="module")
def qat_bundle_dir(tmp_path_factory):
    pytest.importorskip("nncf")
    pytest.importorskip("torchao", reason="nncf.strip(NATIVE) needs torchao: pip install edgevl[export]")
    from edgevl.exporters.quantize.qat import qat_bundle
    from edgevl.exporters.quantize.recipes import QATRecipe

    out = tmp_path_factory.mktemp("qat") / "tiny-qat"
    recipe = QATRecipe(steps=2, batch_scenes=2, calib_samples=4, decoder_prompts=2, eval_scenes=2,
                       eval_backends=("onnxruntime",))
    return qat_bundle("edgevl-tiny", out, recipe, log=lambda *a: None, progress=False)


def test_qat_bundle_is_loadable_qdq(qat_bundle_dir):
    import edgevl
    from edgevl.bundle import load_bundle
    from edgevl.data.world import make_scene
    from edgevl.exporters.quantize.qdq import count_qdq

    bundle = load_bundle(qat_bundle_dir.path)
    for part in ("vision", "decoder"):
        counts = count_qdq(bundle.part_file(part))
        assert counts["QuantizeLinear"] > 0 and counts["int8_ops"], part
    q = bundle.manifest["quantization"]
    assert q["method"] == "qat" and q["steps"] == 2 and bundle.precision == "int8"
    assert bundle.report("training")["steps"][0]["loss"] > 0
    report = bundle.report("accuracy")
    assert report["parts"]["vision"]["onnxruntime"]["outputs"]["image_embeds"]["cosine"] > 0.9
    with edgevl.load(bundle.path, backend="onnxruntime", verbose=False) as vlm:
        answer = vlm.answer([make_scene("test", 2).image()], ["describe the image."])[0]
    assert isinstance(answer, str)


def test_qat_scores_at_least_as_well_as_ptq(tiny_bundle, tmp_path):
    """On the same held-out scenes and backend, QAT's accuracy >= PTQ's (default recipe).
    30 steps by default (about a minute); EDGEVL_QAT_STEPS=300 EDGEVL_QAT_SCENES=1000 is the
    committed run's setting (benchmarks/results/quant_accuracy.md)."""
    from edgevl.bundle import load_bundle
    from edgevl.exporters.quantize.ptq import quantize_bundle
    from edgevl.exporters.quantize.qat import qat_bundle
    from edgevl.exporters.quantize.recipes import PTQRecipe, QATRecipe
    from edgevl.exporters.quantize.report import evaluate_bundle

    n = int(os.environ.get("EDGEVL_QAT_SCENES", "200"))
    ptq = quantize_bundle(tiny_bundle, "world", tmp_path / "ptq", PTQRecipe(accept_loss=True, eval_scenes=20,
                                                                            eval_backends=("onnxruntime",)),
                          log=lambda *a: None, progress=False)
    qat = qat_bundle("edgevl-tiny", tmp_path / "qat", QATRecipe(steps=int(os.environ.get("EDGEVL_QAT_STEPS", "30")),
                                                               eval_scenes=20, eval_backends=("onnxruntime",)),
                     log=lambda *a: None, progress=False)
    a_ptq = evaluate_bundle(load_bundle(ptq.path), "onnxruntime", n, "test")["accuracy"]
    a_qat = evaluate_bundle(load_bundle(qat.path), "onnxruntime", n, "test")["accuracy"]
    assert a_qat >= a_ptq, f"QAT {a_qat:.3f} < PTQ {a_ptq:.3f} on {n} test scenes"
