"""The benchmark harness end to end on fake subjects (real worker processes, no models):
interleaved rounds, the JSON schema, failure isolation, speed-up arithmetic, Markdown, plots."""

from __future__ import annotations

import json

import pytest

from edgevl.benchmarks.bundles import BuildUnavailable, build_bundle
from edgevl.benchmarks.orchestrate import run_plan
from edgevl.benchmarks.report import ROW_KEYS, document, markdown, write_json
from edgevl.benchmarks.variants import Plan, Settings, Setup

MACHINE = {"cpu": "test cpu", "usable_cores": 2, "memory_gb": 1.0, "flags": ["avx2"]}
BANDWIDTH = {"copy_gb_s": 10.0, "read_gb_s": 10.0}

TORCH = Setup("fake", "pytorch", "pytorch", "fp32")
FAST = Setup("fake", "edgevl", "onnxruntime", "fp32")
UNBUILDABLE = Setup("fake", "edgevl", "openvino", "int8")
CRASHES = Setup("fake", "edgevl", "openvino", "fp32")
CRASHES_AT_B2 = Setup("fake", "edgevl", "tensorrt", "fp32")

SPECS = {
    TORCH.key: {"kind": "fake", "vision_ms": 8.0, "prefill_ms": 8.0, "step_ms": 4.0},
    FAST.key: {"kind": "fake", "vision_ms": 0.5, "prefill_ms": 0.5, "step_ms": 0.25},
    CRASHES.key: {"kind": "fake", "fail": "round"},
    CRASHES_AT_B2.key: {"kind": "fake", "fail": "round", "fail_batch": 2},
}


def prepare(setup: Setup) -> dict:
    if setup == UNBUILDABLE:
        raise BuildUnavailable("precision 'int8' needs the quantizing builder (test)")
    return dict(SPECS[setup.key])


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    settings = Settings(new_tokens=6, positions=(64, 512), position_steps=4, rounds=2, budget_s=0.4,
                        generate_batches=(1,), accuracy_scenes=0, overhead_pairs=0, pause_s=0.0, warmup=1)
    plan = Plan([TORCH, FAST, UNBUILDABLE, CRASHES, CRASHES_AT_B2], (1, 2), settings)
    logs = tmp_path_factory.mktemp("logs")
    runs = run_plan(plan, prepare, log_dir=logs, progress=False, log=lambda m: None)
    return document(runs, plan.batches, MACHINE, BANDWIDTH, settings.to_dict())


def _row(doc, setup, batch):
    return next(r for r in doc["variants"] if r["key"] == f"{setup.key}/b{batch}")


def test_every_variant_has_a_row_with_the_schema(doc):
    assert len(doc["variants"]) == 5 * 2
    for row in doc["variants"]:
        for key in ROW_KEYS:
            assert key in row, key
    assert doc["machine"] == MACHINE and doc["bandwidth"] == BANDWIDTH
    json.loads(json.dumps(doc))                       # plain JSON all the way down


def test_measured_rows_have_numbers(doc):
    row = _row(doc, FAST, 1)
    assert row["status"] == "ok" and row["error"] is None
    for key in ("vision_ms_p50", "ttft_ms_p50", "decode_tok_s", "e2e_ms_p50", "peak_rss_mb", "size_mb"):
        assert row[key] is not None and row[key] > 0, key
    assert row["vision_ms_p10"] <= row["vision_ms_p50"] <= row["vision_ms_p90"]
    assert row["vision_ms_n"] >= 2                    # at least one sample per round
    assert row["size_mb"] == 4.0 and row["decoder_weight_mb"] == 2.0
    # 10 GB/s over 2 MB of weights per token
    assert row["decode_ceiling_tok_s"] == pytest.approx(5000.0)
    assert row["decode_ceiling_fraction"] == pytest.approx(row["decode_tok_s"] / 5000.0, abs=1e-4)
    assert set(row["decode_tok_s_at"]) == {"64", "507"}   # 512 clamped to the fake's 512-token context
    # batch 2: vision only (generation measured at batch 1), its own memory reading
    row2 = _row(doc, FAST, 2)
    assert row2["vision_ms_p50"] is not None and row2["ttft_ms_p50"] is None and row2["decode_tok_s"] is None
    assert row2["peak_rss_mb"] >= row["peak_rss_mb"]


def test_speedups_are_ratios_to_pytorch(doc):
    torch_row, fast = _row(doc, TORCH, 1), _row(doc, FAST, 1)
    assert torch_row["speedup_vs_torch"] == pytest.approx(1.0)
    assert fast["speedup_metric"] == "e2e"
    assert fast["speedup_vs_torch"] == pytest.approx(torch_row["e2e_ms_p50"] / fast["e2e_ms_p50"], rel=1e-2)
    assert fast["speedups_vs_torch"]["decode"] == pytest.approx(fast["decode_tok_s"] / torch_row["decode_tok_s"],
                                                                rel=1e-2)
    assert fast["speedup_vs_torch"] > 1               # the fake is 16x cheaper (a busy machine blurs it)
    fast2 = _row(doc, FAST, 2)
    assert fast2["speedup_metric"] == "vision" and fast2["speedup_vs_torch"] > 1


def test_failed_build_is_reported_and_others_still_run(doc):
    for batch in (1, 2):
        row = _row(doc, UNBUILDABLE, batch)
        assert row["status"] == "failed"
        assert "build failed" in row["error"] and "quantizing builder" in row["error"]
        assert row["vision_ms_p50"] is None and row["speedup_vs_torch"] is None
    crashed = _row(doc, CRASHES, 1)
    assert crashed["status"] == "failed" and "told to fail at round" in crashed["error"]
    assert _row(doc, FAST, 2)["status"] == "ok" and _row(doc, TORCH, 2)["status"] == "ok"
    # a worker that dies at batch 2 keeps its batch-1 row, with a warning
    early, late = _row(doc, CRASHES_AT_B2, 1), _row(doc, CRASHES_AT_B2, 2)
    assert early["status"] == "ok" and early["vision_ms_p50"] is not None
    assert any("failed later, at batch 2" in w for w in early["warnings"])
    assert late["status"] == "failed" and "measuring batch 2 failed" in late["error"]


def test_markdown_table_renders(doc):
    text = markdown(doc)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| model"))
    assert lines[header + 1].startswith("|---")
    body = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        body.append(line)
    assert len(body) == 10
    cols = lines[header].count("|")
    assert all(line.count("|") == cols for line in body if "failed" not in line)
    assert "PyTorch eager fp32" in text and "1.00x (ref)" in text
    assert "failed: build failed" in text
    assert "10.0 GB/s" in text


def test_json_and_plots_are_written(doc, tmp_path):
    path = write_json(doc, tmp_path / "out" / "bench.json")
    assert json.loads(path.read_text())["schema"] == "edgevl-bench/1"
    pytest.importorskip("matplotlib", reason="plots need matplotlib (dev extra)")
    from edgevl.benchmarks.plots import plot_all

    written = plot_all(doc, tmp_path / "plots")
    assert {p.name for p in written} >= {"latency.png", "tokens_per_s.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_build_without_the_quantizing_builder_says_what_to_do(tmp_path, monkeypatch):
    import edgevl.benchmarks.bundles as bundles

    monkeypatch.setattr(bundles, "_real_builder", lambda: None)
    with pytest.raises(BuildUnavailable, match="fp32"):
        build_bundle("edgevl-tiny", "openvino", "int8", tmp_path / "b", log=lambda m: None)


def test_bad_requests_are_refused_with_a_clear_error():
    from edgevl.benchmarks.variants import parse_batches, plan_setups
    from edgevl.cli.main import main
    from edgevl.errors import ConfigError

    with pytest.raises(ConfigError, match="known: onnxruntime"):
        plan_setups(["edgevl-tiny"], ["tensorflow"], ["fp32"])
    with pytest.raises(ConfigError, match="unknown peer"):
        plan_setups(["edgevl-tiny"], ["onnxruntime"], ["fp32"], peers=["llama.cpp"])
    with pytest.raises(ConfigError, match=">= 1"):
        parse_batches("0,8")
    with pytest.raises(ConfigError, match="integers"):
        parse_batches("1,eight")
    assert main(["bench", "--model", "edgevl-tiny", "--batch", "1"]) == 2      # --json missing: error, no run


def test_reference_comes_first_and_peers_last():
    from edgevl.benchmarks.variants import plan_setups

    setups = plan_setups(["m"], ["onnxruntime", "openvino"], ["fp32", "int8"], peers=["ort-quantize-dynamic"])
    assert setups[0].is_reference and setups[0].key == "m/pytorch/fp32"
    assert [s.key for s in setups[1:]] == ["m/onnxruntime/fp32", "m/onnxruntime/int8", "m/openvino/fp32",
                                           "m/openvino/int8", "m/ort-quantize-dynamic:onnxruntime/int8-dynamic"]


def test_a_busy_machine_is_called_out(doc):
    busy = dict(doc, machine={**MACHINE, "load_average": [5.0, 5.0, 5.0]})
    assert "**The machine was busy**" in markdown(busy)
    assert "**The machine was busy**" not in markdown(dict(doc, machine={**MACHINE, "load_average": [0.1, 0.1, 0.1]}))


def test_runtime_targets_are_checked_on_edgevl_fp32_rows(doc):
    checks = [c for c in doc["runtime_targets"] if c["model"] == "fake"]
    assert {c["backend"] for c in checks} == {"onnxruntime", "tensorrt"}   # the crashed openvino row has none
    decode = next(c for c in checks if c["check"].startswith("decode tok/s vs"))
    assert decode["value"] == _row(doc, FAST, 1)["speedups_vs_torch"]["decode"]
    assert decode["ok"] == (decode["value"] >= 1.7)
    overhead = next(c for c in checks if "overhead" in c["check"])
    assert overhead["value"] is None and overhead["ok"] is None       # overhead_pairs=0: not measured
    assert "runtime target" in markdown(doc)


def test_precision_can_be_limited_to_one_model():
    from edgevl.benchmarks.variants import plan_setups

    setups = plan_setups(["edgevl-tiny", "big"], ["onnxruntime"], ["fp32", "int8@edgevl-tiny"])
    rows = [(s.model, s.precision) for s in setups if s.backend == "onnxruntime"]
    assert rows == [("edgevl-tiny", "fp32"), ("edgevl-tiny", "int8"), ("big", "fp32")]


def test_untrustworthy_speedups_are_marked_with_reasons(doc):
    fast = _row(doc, FAST, 1)
    trust = fast["speedup_trust"]                                    # 2 rounds: too few samples to trust
    assert trust["trustworthy"] is False and any("fewer than 5" in r for r in trust["reasons"])
    assert set(fast["speedups_trust"]) == {"vision", "ttft", "decode", "e2e"}
    text = markdown(doc)
    assert f"{fast['speedup_vs_torch']:.2f}x e2e !" in text
    assert "- ratios marked ! or (not trustworthy): [not trustworthy: " in text and "rerun on a quiet machine]" in text
