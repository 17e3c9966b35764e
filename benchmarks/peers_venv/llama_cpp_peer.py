"""The ``llama-cpp-*`` peers: llama.cpp, the tool edge-CPU users pick, on the bench's checkpoint.

Built by ``make_llama_cpp.sh`` (llama.cpp vendored in the llama-cpp-python sdist) into the bench
cache; run by peer_worker.py with edgevl's own python (no peers venv needed: the worker only
starts llama.cpp's binaries and reads their output; the converter wants transformers 5, which
edgevl's venv has and the peers venv does not). Standard library + numpy only.

Preparation (once per checkpoint, cached in the spec's ``work_dir``), on a COPY of the checkpoint
(symlinks to the weights, rewritten small files; the cached checkpoint is never touched), with
the three fixes a random-weight checkpoint needs (../../shared/MEASURED.md item 15):

1. ``text_config.architectures = ["VLlama3ForCausalLM"]`` (Idefics3/SmolVLM): the converter picks
   the text class from it, and the Idefics3 class is registered for the projector only;
2. a random BPE's pre-tokenizer hash is unknown to ``convert_hf_to_gguf.py``: fall back to
   "gpt-2" (the checkpoint's pre-tokenizer is GPT-2's ByteLevel) instead of raising;
3. llama-mtmd-cli's idefics3 path looks up a "\\n\\n" token and asserts without it: add "ĊĊ"
   (byte-level "\\n\\n") to the BPE vocabulary with its merge, at an id below ``vocab_size``;

plus one setting: the image processor's ``size.longest_edge`` is set to its ``max_image_size``
(512), the fewest views llama.cpp's idefics3 preprocessor can encode: it always encodes an
overview plus the tiles of the resized image, and has no option that turns the tiles off
(``--image-max-tokens`` only applies to GGUFs without a longest edge, and still tiles). So it
encodes 2 views of 512 px per image where edgevl encodes 1; each row says so.

Then ``convert_hf_to_gguf.py --outtype f16`` (decoder) and ``--mmproj --outtype f16`` (vision +
projector), and ``llama-quantize`` F16 -> Q8_0 / Q4_0.

Measurement, per round, batch 1 (llama.cpp's CLI runs one prompt):

- ``llama-mtmd-cli -lv 4`` with the scene image, the bench's prompt and exactly N new tokens
  (greedy, EOS ignored), one fresh process per run, model load not counted: TTFT = image load +
  preprocess + tokenize + vision + prefill + first token (from its log timestamps, see
  ``parse_mtmd``), decode tok/s = its "eval time" runs/s, end to end = TTFT + (N - 1) decode
  steps, vision = its "mtmd batch encoding done" times (all views of the image);
- ``llama-bench -o json -p 0 -n STEPS -d POSITIONS``: decode tok/s with the KV cache holding that
  many positions (tg at depth), llama.cpp's own measure;
- peak RSS: the largest ru_maxrss of the llama.cpp processes run so far (os.wait4).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

TOOLS = ("llama-bench", "llama-mtmd-cli", "llama-quantize")
QUANTS = {"q8_0": "Q8_0", "q4_0": "Q4_0"}
TEXT_ARCH = {"idefics3": "VLlama3ForCausalLM", "smolvlm": "VLlama3ForCausalLM"}
DOUBLE_NEWLINE = "ĊĊ"        # "\n\n" in byte-level BPE
MAKE_SCRIPT = "bash benchmarks/peers_venv/make_llama_cpp.sh"
PRE_TOKENIZER_FALLBACK = "unknown BPE pre-tokenizer (random vocabulary): using 'gpt-2'"


class LlamaCppMissing(RuntimeError):
    pass


def check_build(root: str | Path) -> Path:
    """The build's bin directory, or an error naming the script that builds it."""
    root = Path(root)
    missing = [t for t in TOOLS if not (root / "build" / "bin" / t).is_file()]
    if missing or not (root / "READY").is_file():
        raise LlamaCppMissing(f"llama.cpp is not built in {root} (missing: {', '.join(missing) or 'READY'}); "
                              f"build it once with `{MAKE_SCRIPT}` (10-20 min on 2 cores)")
    return root / "build" / "bin"


# -- the checkpoint copy and its fixes ---------------------------------------------------------
def gguf_checkpoint(src: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """A copy of ``src`` that convert_hf_to_gguf.py and llama-mtmd-cli accept: weights symlinked,
    config.json / tokenizer.json / processor configs rewritten. Returns (path, fixes applied)."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fixes: list[str] = []
    for f in sorted(src.iterdir()):
        target = out / f.name
        if target.is_symlink() or target.exists():
            target.unlink()
        if f.name == "config.json":
            data = json.loads(f.read_text())
            text = data.get("text_config")
            arch = TEXT_ARCH.get(data.get("model_type", ""))
            if isinstance(text, dict) and arch and not text.get("architectures"):
                text["architectures"] = [arch]
                fixes.append(f"config.json text_config.architectures = [{arch!r}]")
            target.write_text(json.dumps(data, indent=2))
        elif f.name == "tokenizer.json":
            data = json.loads(f.read_text())
            if add_double_newline(data, _vocab_size(src)):
                fixes.append('tokenizer.json: "\\n\\n" token (ĊĊ) added to the BPE vocabulary')
            target.write_text(json.dumps(data, ensure_ascii=False))
        elif f.name in ("processor_config.json", "preprocessor_config.json"):
            data = json.loads(f.read_text())
            ip = data.get("image_processor", data)
            edge = (ip.get("max_image_size") or {}).get("longest_edge")
            if edge and (ip.get("size") or {}).get("longest_edge", edge) != edge:
                ip["size"] = {**ip.get("size", {}), "longest_edge": edge}
                fixes.append(f"{f.name}: size.longest_edge = {edge} (one {edge} px tile + llama.cpp's overview)")
            target.write_text(json.dumps(data, indent=2))
        else:
            target.symlink_to(f.resolve())
    return out, fixes


def _vocab_size(src: Path) -> int | None:
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return (config.get("text_config") or {}).get("vocab_size") or config.get("vocab_size")


def add_double_newline(tokenizer: dict, vocab_size: int | None) -> bool:
    """Add "\\n\\n" (ĊĊ) and its merge to a byte-level BPE tokenizer.json dict, in place; False
    when it is there already, or when there is no free id below ``vocab_size``."""
    model = tokenizer.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or DOUBLE_NEWLINE in vocab:
        return False
    used = set(vocab.values()) | {t["id"] for t in tokenizer.get("added_tokens", [])}
    new_id = max(used) + 1
    if vocab_size is not None and new_id >= vocab_size:
        return False
    vocab[DOUBLE_NEWLINE] = new_id
    merges = model.setdefault("merges", [])
    merges.append(["Ċ", "Ċ"] if merges and isinstance(merges[0], list) else "Ċ Ċ")
    return True


# -- converting --------------------------------------------------------------------------------
def convert_main(src: str, argv: list[str]) -> None:
    """``convert_hf_to_gguf.py ARGV`` from llama.cpp's tree ``src``, with fix 2 (the pre-tokenizer
    fallback) patched in from outside: llama.cpp itself is not modified."""
    import logging
    import runpy

    script = Path(src) / "convert_hf_to_gguf.py"
    sys.path[:0] = [str(Path(src)), str(Path(src) / "gguf-py")]
    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            logging.getLogger("edgevl").warning(PRE_TOKENIZER_FALLBACK)
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


def _run(cmd: list, env: dict | None = None, what: str = "") -> str:
    done = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, errors="replace")
    if done.returncode != 0:
        tail = " / ".join(done.stdout.strip().splitlines()[-4:])
        raise RuntimeError(f"{what or Path(str(cmd[0])).name} failed (exit {done.returncode}): {tail}")
    return done.stdout


def _atomic(path: Path, make) -> Path:
    """``make(tmp)`` then rename: an interrupted conversion never leaves a file that looks done."""
    if path.is_file():
        return path
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    make(tmp)
    os.replace(tmp, path)
    return path


# -- parsing llama.cpp's output ----------------------------------------------------------------
_PERF = re.compile(r"llama_perf_context_print:\s+(?P<what>load|prompt eval|eval|total) time =\s*(?P<ms>[\d.]+) ms"
                   r"(?:\s*/\s*(?P<n>\d+) (?:tokens|runs))?")
_ENCODE = re.compile(r"(?:mtmd batch encoding done in|image slice encoded in) (?P<ms>\d+(?:\.\d+)?) ms")
_IMAGE_BATCH = re.compile(r"decoding image batch \d+/\d+, n_tokens_batch = (?P<n>\d+)")
_VIEWS = re.compile(r"encoding mtmd batch, n_chunks = (?P<n>\d+)")
# -lv 4 log lines start with the time since start: minutes.seconds.milliseconds.microseconds
_STAMP = re.compile(r"^(?P<m>\d+)\.(?P<s>\d{2})\.(?P<ms>\d{3})\.(?P<us>\d{3}) ")
READY_MARK = "WARN: This is an experimental CLI"      # printed after loading, before the prompt is read
END_MARK = "llama_perf_context_print:        load time"  # printed after generation


def _stamp_ms(text: str, mark: str) -> float | None:
    """The timestamp (ms since the tool started) of the last log line containing ``mark``."""
    found = None
    for line in text.splitlines():
        if mark in line:
            m = _STAMP.match(line)
            if m:
                found = ((int(m["m"]) * 60 + int(m["s"])) * 1000 + int(m["ms"]) + int(m["us"]) / 1000)
    return found


def parse_mtmd(text: str, new_tokens: int) -> dict:
    """Timings of one ``llama-mtmd-cli -lv 4 -n N --ignore-eos`` run.

    - decode step: llama_perf's "eval time" / runs (the single-token decodes it synchronised);
    - TTFT: from the line it prints once model and projector are loaded to the perf print after
      generation, less the N single-token decodes it ran (its loop decodes every sampled token):
      image load + preprocess + tokenize + vision encode + prefill + first token. Without
      timestamps, its "prompt eval time" (first prompt decode to first token: it spans the vision
      encodes between the prompt's chunks, not the preprocessing);
    - vision: the sum of its "mtmd batch encoding done" times (every view of the image).
    """
    perf = {}
    for m in _PERF.finditer(text):
        perf[m["what"]] = (float(m["ms"]), int(m["n"]) if m["n"] else None)
    if "prompt eval" not in perf or "eval" not in perf:
        tail = " / ".join(text.strip().splitlines()[-4:])
        raise ValueError(f"no llama_perf timings in llama-mtmd-cli's output (is -lv 4 set?): {tail}")
    encode = [float(m["ms"]) for m in _ENCODE.finditer(text)]
    prompt_ms, prompt_tokens = perf["prompt eval"]
    eval_ms, runs = perf["eval"]
    step_ms = eval_ms / runs if runs else None
    ready, end = _stamp_ms(text, READY_MARK), _stamp_ms(text, END_MARK)
    if ready is not None and end is not None and step_ms:
        ttft, source = end - ready - new_tokens * step_ms, "log timestamps"
    else:
        ttft, source = prompt_ms, "prompt eval time"
    return {"vision_ms": sum(encode) if encode else None, "prefill_ms": prompt_ms, "ttft_ms": ttft,
            "ttft_source": source, "prompt_tokens": prompt_tokens, "decode_runs": runs,
            "decode_tok_s": 1e3 / step_ms if step_ms else None,
            "e2e_ms": ttft + (new_tokens - 1) * step_ms if step_ms else None,
            "load_ms": perf.get("load", (None, None))[0],
            "image_tokens": sum(int(m["n"]) for m in _IMAGE_BATCH.finditer(text)) or None,
            "views": sum(int(m["n"]) for m in _VIEWS.finditer(text)) or None}


def parse_bench_json(text: str) -> dict[str, list[float]]:
    """``llama-bench -o json`` -> {depth: [tokens/s samples]} of its generation (tg) tests."""
    start = text.find("[")
    if start < 0:
        raise ValueError(f"no JSON array in llama-bench's output: {text.strip()[-300:]}")
    tests, _ = json.JSONDecoder().raw_decode(text[start:])
    out: dict[str, list[float]] = {}
    for t in tests:
        if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0:
            samples = t.get("samples_ts") or [t["avg_ts"]]
            out.setdefault(str(t.get("n_depth", 0)), []).extend(float(s) for s in samples)
    return out


# -- the peer ----------------------------------------------------------------------------------
def write_png(path: Path, rgb) -> Path:
    """An RGB uint8 array as PNG, standard library only (llama.cpp reads images from files)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    return path


class LlamaCpp:
    """One quantization of the checkpoint in llama.cpp (spec["precision"]: q8_0 or q4_0)."""

    transformers = False          # peer_worker: no compat checkpoint, no torch threads

    def __init__(self, spec: dict):
        self.spec = spec
        self.quant = spec["precision"]
        lc = spec["llama_cpp"]
        self.root, self.src = Path(lc["root"]), Path(lc["src"])
        self.convert_python = lc.get("convert_python") or sys.executable
        self.work = Path(spec["work_dir"]) / "llama.cpp"
        self.threads = int(spec.get("threads") or 2)
        self.peak_kb = 0
        self.fixes: list[str] = []

    # paths
    @property
    def f16(self) -> Path:
        return self.work / "model-f16.gguf"

    @property
    def model(self) -> Path:
        return self.work / f"model-{self.quant}.gguf"

    @property
    def mmproj(self) -> Path:
        return self.work / "mmproj-f16.gguf"

    def needs_export(self) -> bool:
        return not (self.model.is_file() and self.mmproj.is_file())

    def export(self) -> None:
        bin_dir = check_build(self.root)
        self.work.mkdir(parents=True, exist_ok=True)
        ckpt, fixes = gguf_checkpoint(self.spec["checkpoint"], self.work / "checkpoint-gguf")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.src / "gguf-py"), str(self.root / "pylib")]))
        convert = [self.convert_python, Path(__file__).resolve(), "--convert", self.src, ckpt]
        if not self.f16.is_file():
            log = _run([*convert, "--outtype", "f16", "--outfile", self.f16.with_name(self.f16.name + ".tmp")], env,
                       "convert_hf_to_gguf")
            if PRE_TOKENIZER_FALLBACK in log:
                fixes.append("convert_hf_to_gguf.py: unknown BPE pre-tokenizer (random vocabulary) -> 'gpt-2'")
            os.replace(self.f16.with_name(self.f16.name + ".tmp"), self.f16)
            (self.work / "fixes.json").write_text(json.dumps(fixes, indent=2))
        _atomic(self.mmproj, lambda t: _run([*convert, "--mmproj", "--outtype", "f16", "--outfile", t], env,
                                            "convert_hf_to_gguf --mmproj"))
        _atomic(self.model, lambda t: _run([bin_dir / "llama-quantize", self.f16, t, QUANTS[self.quant],
                                            str(self.threads)], what="llama-quantize"))

    def load(self) -> None:
        self.bin = check_build(self.root)
        if self.needs_export():
            raise RuntimeError(f"{self.model} or {self.mmproj} is missing after conversion")
        fixes = self.work / "fixes.json"
        self.fixes = json.loads(fixes.read_text()) if fixes.is_file() else []
        import numpy as np

        self.image = write_png(self.work / "scene0.png", np.load(self.spec["images"])[0])
        self.build_info = json.loads((self.root / "READY").read_text())

    def size_bytes(self) -> int:
        return self.model.stat().st_size + self.mmproj.stat().st_size

    def describe(self, settings: dict) -> dict:
        """Facts of the row, from one untimed run (it also warms the page cache): what llama.cpp
        encoded for the image, said in the row's note."""
        r = self.mtmd(settings.get("prompt", "describe the image."), 2)
        note = (f"llama.cpp {self.build_info.get('llama_cpp_python', '?')} (commit "
                f"{str(self.build_info.get('llama_cpp_commit', '?'))[:9]}), GGUF {QUANTS[self.quant]} decoder + F16 "
                f"mmproj, {self.threads} threads: its idefics3 preprocessor encoded {r['views'] or '?'} views of 512 px "
                f"per image (an overview + the tiles; no option turns the tiles off) = {r['image_tokens'] or '?'} image "
                f"tokens, where edgevl encodes 1 view; vision = llama-mtmd-cli's encode time of all views; TTFT "
                f"from its log ({r['ttft_source']}), model load not counted; decode at positions = llama-bench tg"
                f"{settings.get('position_steps', 16)} at depth")
        return {"decoder_weight_bytes": decode_weight_bytes(self.model, self.src), "image_tokens": r["image_tokens"],
                "views": r["views"], "llama_cpp": self.build_info, "conversion_fixes": self.fixes, "note": note}

    # running
    def _child(self, cmd: list) -> str:
        """Run a llama.cpp tool; reap it with wait4 to read its own peak resident memory."""
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        with proc.stdout:
            out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        self.peak_kb = max(self.peak_kb, usage.ru_maxrss)
        if proc.returncode:
            tail = " / ".join(out.strip().splitlines()[-4:])
            raise RuntimeError(f"{Path(str(cmd[0])).name} failed (exit {proc.returncode}): {tail}")
        return out

    def mtmd(self, prompt: str, n: int) -> dict:
        out = self._child([self.bin / "llama-mtmd-cli", "-m", self.model, "--mmproj", self.mmproj,
                           "--image", self.image, "-p", prompt, "-n", n, "-t", self.threads, "-c", 2048,
                           "--temp", 0, "--ignore-eos", "-lv", 4])
        return parse_mtmd(out, n)

    def bench(self, positions, steps: int, reps: int) -> dict[str, list[float]]:
        out = self._child([self.bin / "llama-bench", "-m", self.model, "-t", self.threads, "-p", 0, "-n", steps,
                           "-d", ",".join(str(p) for p in positions), "-r", reps, "-o", "json"])
        return parse_bench_json(out)

    def round(self, batch: int, budget_s: float, settings: dict, first: bool) -> dict:
        out: dict = {"batch": batch, "vision_ms": [], "ttft_ms": [], "e2e_ms": [], "decode_tok_s": []}
        if batch != 1 or batch not in settings.get("generate_batches", [1]):
            return out                      # llama.cpp's CLI runs one prompt: batch 1 only
        n = int(settings.get("new_tokens", 32))
        prompt = settings.get("prompt", "describe the image.")
        t0 = time.perf_counter()
        while not out["e2e_ms"] or time.perf_counter() - t0 < budget_s * 0.6:
            r = self.mtmd(prompt, n)
            for key in ("vision_ms", "ttft_ms", "e2e_ms", "decode_tok_s"):
                if r[key] is not None:
                    out[key].append(r[key])
            out["prompt_tokens"] = r["prompt_tokens"]
        positions = settings.get("positions") or []
        steps = int(settings.get("position_steps", 16))
        if positions and steps > 1:
            out["decode_tok_s_at"] = self.bench(positions, steps, reps=2)
        return out

    def peak_rss_mb(self) -> float:
        return self.peak_kb / 1024.0


def decode_weight_bytes(model: Path, src: Path) -> int | None:
    """Bytes of the GGUF tensors one decode step reads: all but the input embedding table,
    unless that table is also the output head (tied, as SmolVLM's is)."""
    try:
        sys.path.insert(0, str(src / "gguf-py"))
        from gguf import GGUFReader
    except ImportError:
        return None
    finally:
        if sys.path and sys.path[0] == str(src / "gguf-py"):
            sys.path.pop(0)
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(model)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors.get("token_embd.weight", 0)
    return total


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--convert":
        convert_main(sys.argv[2], sys.argv[3:])
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
