"""The llama.cpp and ONNX Runtime GenAI peers' CPU-side logic, with no build and no model: parsing
llama.cpp's output (real captures in tests/data/peers/), the conversion fixes on a copy of a
checkpoint, the text-only checkpoint for ORT GenAI's builder, and the failed row when a tool is
missing. The peers themselves run in `edgevl bench --peers llama-cpp-q8_0,...`."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from edgevl.benchmarks.orchestrate import run_plan
from edgevl.benchmarks.peers import PEERS, PeerCannotRun, prepare_peer
from edgevl.benchmarks.report import document, markdown
from edgevl.benchmarks.variants import Plan, Settings, plan_setups

PEERS_DIR = Path(__file__).parents[1] / "benchmarks" / "peers_venv"
DATA = Path(__file__).parent / "data" / "peers"
NATIVE = ["llama-cpp-q8_0", "llama-cpp-q4_0", "ort-genai-int4", "ort-genai-int8"]


def _module(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PEERS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llama():
    return _module("llama_cpp_peer")


@pytest.fixture(scope="module")
def ort_genai():
    return _module("ort_genai_peer")


# -- parsing llama.cpp's output ----------------------------------------------------------------
def test_mtmd_cli_timings_are_parsed(llama):
    """llama-mtmd-cli -lv 4 -n 32 --ignore-eos on smolvlm-256m-shaped Q8_0 (a busy 2-core machine)."""
    r = llama.parse_mtmd((DATA / "llama-mtmd-cli-q8_0.txt").read_text(), new_tokens=32)
    step = 619.92 / 31
    assert r["decode_runs"] == 31 and r["decode_tok_s"] == pytest.approx(1e3 / step)
    assert r["prompt_tokens"] == 148 and r["prefill_ms"] == pytest.approx(14471.88)
    assert r["vision_ms"] == pytest.approx(4759 + 4838)          # two views: overview + one tile
    assert r["views"] == 2 and r["image_tokens"] == 128
    # loaded at 0.388 s ("experimental CLI" warning), perf printed at 15.536 s, less 32 decode steps
    assert r["ttft_source"] == "log timestamps"
    assert r["ttft_ms"] == pytest.approx(15536.431 - 388.072 - 32 * step, abs=0.01)
    assert r["e2e_ms"] == pytest.approx(r["ttft_ms"] + 31 * step)
    assert r["ttft_ms"] > r["prefill_ms"] - 100                  # prompt eval spans the vision encodes too
    assert r["load_ms"] == pytest.approx(165.04)


def test_mtmd_cli_without_timestamps_falls_back_to_prompt_eval(llama):
    text = "\n".join(line.split(" ", 1)[1] if line[:1].isdigit() else line
                     for line in (DATA / "llama-mtmd-cli-q8_0.txt").read_text().splitlines())
    r = llama.parse_mtmd(text, new_tokens=32)
    assert r["ttft_source"] == "prompt eval time" and r["ttft_ms"] == pytest.approx(14471.88)
    with pytest.raises(ValueError, match="-lv 4"):
        llama.parse_mtmd("main: loading model\nsome output\n", new_tokens=32)


def test_llama_bench_json_is_parsed(llama):
    """llama-bench -p 0 -n 16 -d 64,512 -r 2 -o json: generation samples per depth (noisy machine)."""
    text = (DATA / "llama-bench-q8_0.json").read_text()
    at = llama.parse_bench_json("build: 0c1e570 (1)\n" + text)        # tolerate a line before the array
    assert at == {"64": [5.62359, 10.7024], "512": [4.75906, 50.1504]}
    tests = json.loads(text)
    tests.append(dict(tests[0], n_prompt=512, n_gen=0, n_depth=0, samples_ts=[600.0]))   # pp rows are not decode
    assert set(llama.parse_bench_json(json.dumps(tests))) == {"64", "512"}
    with pytest.raises(ValueError, match="no JSON"):
        llama.parse_bench_json("error: failed to load model\n")


# -- the conversion fixes, on a copy -----------------------------------------------------------
def _idefics3_checkpoint(root: Path, vocab_size: int = 500) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps({
        "architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3", "tie_word_embeddings": True,
        "text_config": {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 8,
                        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}},
        "vision_config": {"model_type": "idefics3_vision"}}))
    vocab = {"<|endoftext|>": 0, "<image>": 1, "Ċ": 2, "a": 3, "b": 4, "ab": 5}
    (root / "tokenizer.json").write_text(json.dumps({
        "added_tokens": [{"id": 0, "content": "<|endoftext|>"}, {"id": 1, "content": "<image>"}],
        "model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"]]}}))
    (root / "processor_config.json").write_text(json.dumps({"image_processor": {
        "do_image_splitting": True, "size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}}}))
    (root / "model.safetensors").write_bytes(b"weights")
    return root


def test_conversion_fixes_are_applied_to_a_copy(llama, tmp_path):
    src = _idefics3_checkpoint(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out, fixes = llama.gguf_checkpoint(src, tmp_path / "work" / "gguf")
    assert len(fixes) == 3
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["architectures"] == ["VLlama3ForCausalLM"]
    tok = json.loads((out / "tokenizer.json").read_text())
    assert tok["model"]["vocab"]["ĊĊ"] == 6 and tok["model"]["merges"][-1] == ["Ċ", "Ċ"]
    ip = json.loads((out / "processor_config.json").read_text())["image_processor"]
    assert ip["size"]["longest_edge"] == 512 and ip["max_image_size"]["longest_edge"] == 512
    assert (out / "model.safetensors").is_symlink() and (out / "model.safetensors").resolve() == src / "model.safetensors"
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before               # the original is untouched
    again, fixes_again = llama.gguf_checkpoint(src, tmp_path / "work" / "gguf")     # idempotent
    assert fixes_again == fixes and json.loads((again / "tokenizer.json").read_text()) == tok


def test_conversion_fixes_leave_what_needs_none(llama, tmp_path):
    src = _idefics3_checkpoint(tmp_path / "ckpt", vocab_size=6)                     # no free id for "\n\n"
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="llava", architectures=["LlavaForConditionalGeneration"])   # registered for text
    (src / "config.json").write_text(json.dumps(config))
    out, fixes = llama.gguf_checkpoint(src, tmp_path / "gguf")
    assert fixes == ["processor_config.json: size.longest_edge = 512 (one 512 px tile + llama.cpp's overview)"]
    assert "architectures" not in json.loads((out / "config.json").read_text())["text_config"]
    merges_string_form = {"model": {"type": "BPE", "vocab": {"Ċ": 0}, "merges": ["a b"]}}
    assert llama.add_double_newline(merges_string_form, None) and merges_string_form["model"]["merges"][-1] == "Ċ Ċ"
    assert not llama.add_double_newline(merges_string_form, None)                  # already there


def test_png_writer_makes_a_valid_header(llama, tmp_path):
    import numpy as np
    import zlib

    image = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    data = llama.write_png(tmp_path / "x.png", image).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert int.from_bytes(data[16:20], "big") == 3 and int.from_bytes(data[20:24], "big") == 4
    idat = data.index(b"IDAT")
    raw = zlib.decompress(data[idat + 4:idat + 4 + int.from_bytes(data[idat - 4:idat], "big")])
    assert raw == b"".join(b"\x00" + image[y].tobytes() for y in range(4))


# -- ORT GenAI's text-only checkpoint ----------------------------------------------------------
def test_text_checkpoint_config_and_weight_names(ort_genai):
    config = {"model_type": "idefics3", "tie_word_embeddings": True, "dtype": "float32",
              "text_config": {"model_type": "llama", "hidden_size": 576, "tie_word_embeddings": False,
                              "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}}
    text = ort_genai.text_config_for_builder(config)
    assert text["architectures"] == ["LlamaForCausalLM"] and text["rope_theta"] == 100000.0
    assert text["tie_word_embeddings"] is True and "rope_scaling" not in text
    name = ort_genai.text_weight_name
    assert name("model.text_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert name("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert name("lm_head.weight") == "lm_head.weight"
    assert name("model.vision_model.encoder.layers.0.mlp.fc1.weight") is None
    assert name("model.connector.modality_projection.proj.weight") is None


def test_decode_weight_bytes_skip_gather_only_tables(ort_genai, tmp_path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    embed = numpy_helper.from_array(np.zeros((10, 4), np.float32), "embed")          # Gather only: one row a token
    tied = numpy_helper.from_array(np.zeros((10, 4), np.float32), "tied")            # Gather + MatMul: read whole
    w = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["x"]), helper.make_node("Gather", ["tied", "ids"], ["y"]),
             helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("MatMul", ["z", "tied_t"], ["logits"]),
             helper.make_node("Transpose", ["tied"], ["tied_t"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [embed, tied, w])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    assert ort_genai.decode_weight_bytes(tmp_path / "model.onnx") == (10 * 4 + 4 * 4) * 4


# -- declared like the other peers; a missing tool fails the row, naming the script --------------
def test_native_peers_are_declared():
    assert set(NATIVE) <= set(PEERS)
    keys = [s.key for s in plan_setups(["m"], ["onnxruntime"], ["fp32"], peers=NATIVE)[2:]]
    assert keys == ["m/llama-cpp-q8_0:llama.cpp/q8_0", "m/llama-cpp-q4_0:llama.cpp/q4_0",
                    "m/ort-genai-int4:onnxruntime/int4", "m/ort-genai-int8:onnxruntime/int8"]
    worker = _module("peer_worker")
    assert worker.peer_class("llama-cpp-q4_0").__name__ == "LlamaCpp"
    assert worker.peer_class("ort-genai-int8").__name__ == "OrtGenAI"


class _Preparer:
    threads = 2
    rebuild = False

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir

    def checkpoint_hash(self, model: str) -> str:
        return "0" * 64


def _hf_model(tmp_path: Path):
    from edgevl.benchmarks.models import BenchModel

    return BenchModel("shaped", _idefics3_checkpoint(tmp_path / "ckpt"), "hf", False)


@pytest.mark.parametrize("peer, script", [("llama-cpp-q8_0", "make_llama_cpp.sh"), ("ort-genai-int4", "make_ort_genai.sh")])
def test_a_missing_tool_names_the_script_to_run(tmp_path, peer, script):
    bm = _hf_model(tmp_path)
    setup = plan_setups([bm.name], [], [], peers=[peer])[1]
    with pytest.raises(PeerCannotRun, match=rf"bash benchmarks/peers_venv/{script} --cache-dir {tmp_path / 'bench'}"):
        prepare_peer(setup, bm, _Preparer(tmp_path / "bench"))


def test_a_missing_build_fails_the_row_and_the_run_goes_on(tmp_path, llama):
    bm = _hf_model(tmp_path)
    setups = plan_setups([bm.name], [], [], peers=["llama-cpp-q8_0", "ort-genai-int4"])[1:]
    preparer = _Preparer(tmp_path / "bench")
    settings = Settings(rounds=1, budget_s=0.1, accuracy_scenes=0, overhead_pairs=0, pause_s=0.0)
    runs = run_plan(Plan(setups, (1,), settings), lambda s: prepare_peer(s, bm, preparer), log_dir=tmp_path / "logs",
                    progress=False, log=lambda m: None)
    doc = document(runs, (1,), {"cpu": "test", "usable_cores": 2, "flags": []}, {"copy_gb_s": 10.0}, settings.to_dict())
    rows = {r["tool"]: r for r in doc["variants"]}
    assert rows["llama-cpp-q8_0"]["status"] == "failed"
    assert "make_llama_cpp.sh" in rows["llama-cpp-q8_0"]["error"]
    assert "make_ort_genai.sh" in rows["ort-genai-int4"]["error"]
    assert "failed: build failed: PeerCannotRun: llama-cpp-q8_0 needs llama.cpp" in markdown(doc)
    # the worker side says the same if the build vanished after preparation
    with pytest.raises(llama.LlamaCppMissing, match="make_llama_cpp.sh"):
        llama.check_build(tmp_path / "nowhere")
