"""The ARM64 check's own logic, natively on x86 (the emulated run itself is `make test-arm64`).

Covers the preprocessing tolerance check (+-1 grey level passes, 2 fails), the hwcap decoding
that writes the emulated /proc/cpuinfo, the x86 -> arm64 answer comparison and report, and the
shell script's one-line skip contract.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import arm64_check  # noqa: E402
import arm64_parity  # noqa: E402
import arm64_report  # noqa: E402
from edgevl.preprocess import normalise  # noqa: E402

HAS_CV2 = importlib.util.find_spec("cv2") is not None

SPEC = {"size": [64, 64], "resize_mode": "stretch", "interpolation": "bilinear",
        "rescale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    scene = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    cases = [c for c in arm64_parity.make_cases(scene, SPEC) if "cv2" not in c or HAS_CV2]
    tmp = tmp_path_factory.mktemp("pre")
    return cases, [arm64_parity.run_case(c, tmp, i) for i, c in enumerate(cases)]


def test_preprocess_cases_round_trip_through_the_saved_file(cases, tmp_path):
    cases, results = cases
    arm64_parity.save_cases(cases, results, tmp_path / "p.npz")
    meta = json.loads(json.dumps(arm64_parity.case_metadata(cases)))  # what result.json keeps
    loaded, x86 = arm64_parity.load_cases(meta, np.load(tmp_path / "p.npz"))
    for i, (case, (resized, pixels)) in enumerate(zip(loaded, x86)):
        again = arm64_parity.run_case(case, tmp_path, i)
        check = arm64_parity.compare_case(case, resized, again[0], pixels, again[1])
        assert check["ok"] and check["max_uint8_diff"] == 0, check
    names = " ".join(c["name"] for c in cases)
    for kind in ("JPEG", "PNG", "RGBA", "uint16", "grayscale", "bicubic", "lanczos", "nearest", "centre crop"):
        assert kind in names


def test_one_grey_level_passes_two_fail(cases):
    cases, results = cases
    case, (resized, pixels) = cases[1], results[1]        # the 480x640 photo resized to 64x64
    off_by_one = resized.astype(np.int16)
    off_by_one[::3, ::2] += np.where(off_by_one[::3, ::2] < 255, 1, -1)
    off_by_one = off_by_one.astype(np.uint8)
    ok = arm64_parity.compare_case(case, resized, off_by_one, pixels,
                                   normalise(off_by_one, case["spec"]))
    assert ok["ok"] and ok["max_uint8_diff"] == 1 and 0 < ok["frac_pixels_differing"] < 1
    off_by_two = resized.copy()
    off_by_two[5, 5] = (int(resized[5, 5, 0]) + 2) % 256
    bad = arm64_parity.compare_case(case, resized, off_by_two, pixels,
                                    normalise(off_by_two, case["spec"]))
    assert not bad["ok"] and "more than 1 grey level" in bad["reason"]
    wrong_shape = arm64_parity.compare_case(case, resized, resized[:-1], pixels, pixels)
    assert not wrong_shape["ok"] and "shape" in wrong_shape["reason"]


def test_hwcap_bits_decode_to_cpuinfo_feature_names():
    # what qemu 7.2's cortex-a57 model reports: fp asimd aes pmull sha1 sha2 crc32 cpuid
    assert arm64_check.decode_hwcaps(1 << 11 | 0b11111011, 0) == ["fp", "asimd", "aes", "pmull", "sha1", "sha2",
                                                          "crc32", "cpuid"]
    assert "asimddp" in arm64_check.decode_hwcaps(1 << 20, 0)
    assert arm64_check.decode_hwcaps(0, 1 << 13) == ["i8mm"]
    if os.uname().machine == "x86_64":
        assert arm64_check.hwcaps() == []


def _run(answers, tokens):
    return {"bundle_manifest_sha256": "abc", "backend": "onnxruntime", "precision": "fp32",
            "execution_precision": None, "answers": answers, "tokens": tokens, "correct": 1, "total": 2,
            "seconds": 1.0, "s_per_scene": 0.5}


def test_comparison_lists_each_differing_answer_with_its_question():
    inputs = {"scene_index": [7], "tasks": [["count", "color"]], "questions": [["how many?", "what color?"]],
              "expected": [["two", "red"]]}
    same = arm64_check.compare_runs(_run([["two", "red"]], [[[1], [2]]]), _run([["two", "red"]], [[[1], [2]]]), inputs)
    assert same["ok"] and same["matches"] == 2 and same["mismatches"] == []
    diff = arm64_check.compare_runs(_run([["two", "red"]], [[[1], [2]]]), _run([["two", "blue"]], [[[1], [3]]]), inputs)
    assert not diff["ok"] and diff["matches"] == 1
    assert diff["mismatches"] == [{"scene": 7, "scene_pos": 0, "q": 1, "task": "color", "question": "what color?",
                                   "expected": "red", "x86": "red", "arm64": "blue"}]
    failed = arm64_check.compare_runs(_run([["two", "red"]], [[[1], [2]]]), {"error": "RuntimeError: boom"}, inputs)
    assert not failed["ok"] and "boom" in failed["error"]


def test_report_marks_a_failed_profile_and_writes_the_verified_on_table(tmp_path):
    inputs = {"scene_index": [0], "tasks": [["count"]], "questions": [["how many?"]], "expected": [["two"]], "seed": 0}
    env = {"machine": "x86_64", "python": "3.11", "numpy": "2", "onnxruntime": "1.x", "openvino": "2026",
           "pillow": "13", "opencv": "5", "tokenizers": "0.23", "qemu_cpu": None, "threads": 2,
           "cpu": {"model": "Xeon", "flags": ["avx512f"]}}
    x86 = tmp_path / "x86"
    x86.mkdir()
    (x86 / "result.json").write_text(json.dumps({"environment": env, "inputs": inputs,
                                                 "runs": {"fp32/onnxruntime": _run([["two"]], [[[1]]])}}))
    arm = tmp_path / "arm64-a57"
    arm.mkdir()
    comp = {"ok": False, "gating": True, "matches": 0, "total": 1, "numeric": None,
            "mismatches": [{"scene": 0, "task": "count", "x86": "two", "arm64": "three",
                            "divergence": {"step": 0, "logit_gap": 1e-7, "note": "argmax differs"}}]}
    (arm / "result.json").write_text(json.dumps({
        "profile": "a57", "qemu_cpu": "cortex-a57", "ok": False, "torch_importable": False, "seconds": 3.0,
        "environment": dict(env, machine="aarch64", cpu={"hwcaps": ["fp", "asimd"]}),
        "render_parity": {"scenes": 1, "scenes_differing": 0, "max_uint8_diff": 0},
        "preprocess": [{"case": "c", "ok": True, "max_uint8_diff": 1, "frac_pixels_differing": 0.3}],
        "runs": {"fp32/onnxruntime": _run([["three"]], [[[2]]])}, "comparisons": {"fp32/onnxruntime": comp}}))
    (tmp_path / "arm64-a57.run.json").write_text('{"wall_s": 12, "exit_code": 1}')
    crashed = tmp_path / "arm64-a76"
    assert arm64_report.write_report(x86, [arm, crashed], tmp_path / "out", {"qemu": "qemu 7.2"}) == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert not report["ok"] and report["profiles"]["a57"]["runs"]["fp32/onnxruntime"]["answers_identical"] == 0
    assert "crashed" in report["profiles"]["a76"]["error"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "# ARM64 under emulation: FAILED" in md and "| TensorRT | - | not verified here" in md
    assert "x86 'two', arm64 'three'" in md and "logit gap 1e-07" in md


def test_shell_script_skips_with_one_clear_line_and_exit_77(tmp_path):
    env = dict(os.environ, EDGEVL_PYTHON=str(tmp_path / "no-venv" / "python"), EDGEVL_ARM64_CACHE=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "tools" / "arm64_check.sh"), "--work", str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 77, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("arm64: SKIPPED: ") and len(proc.stdout.strip().splitlines()) == 1
