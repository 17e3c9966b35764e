"""The ``ort-genai-*`` peers: ONNX Runtime GenAI's model builder and runtime, decoder only.

onnxruntime-genai's builder (``python -m onnxruntime_genai.models.builder``) has no class for
Idefics3/SmolVLM (nor LLaVA) VLMs, so these rows measure the checkpoint's language model alone:

- export (once, cached in the spec's ``work_dir``): the checkpoint's text model as a plain
  ``LlamaForCausalLM`` checkpoint (config from ``text_config``, weights renamed from
  ``model.text_model.*`` / ``model.language_model.*``, the tokenizer as transformers 4.57 reads
  it), then ``builder -i TEXT -o OUT -p int4|int8 -e cpu`` (MatMulNBits weight-only, block 32,
  accuracy level 4 = int8 activations on CPU: the builder's CPU defaults);
- TTFT: prefill + first greedy token of the token ids the VLM's processor makes for the bench's
  prompt with one image (image splitting off: edgevl's prompt, 64 image tokens for SmolVLM),
  fed as text: the same length, no vision encoder;
- decode tok/s: exactly N - 1 more greedy tokens after the first (EOS masked by ``min_length``);
  no end-to-end latency (no vision: it would not compare with the VLM rows);
- decode tok/s at positions: a generator whose cache holds P tokens, then ``position_steps`` steps.

Runs on edgevl's own python with make_ort_genai.sh's onnxruntime-genai on PYTHONPATH: the builder
imports transformers 5 classes, which benchmarks/.peers-venv (transformers 4.57) cannot have.
Threads: ``intra_op_num_threads`` in genai_config.json's session options.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TEXT_PREFIXES = ("model.text_model.", "model.language_model.", "language_model.model.")


def text_only_checkpoint(src: str | Path, out: str | Path) -> Path:
    """The VLM checkpoint's language model as a LlamaForCausalLM checkpoint in ``out``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    text = text_config_for_builder(config)
    (out / "config.json").write_text(json.dumps(text, indent=2))
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                name = text_weight_name(key)
                if name is not None:
                    tensors[name] = f.get_tensor(key).contiguous()
    if not any(k.startswith("model.layers.") for k in tensors):
        raise RuntimeError(f"{src}: no language-model weights under {', '.join(TEXT_PREFIXES)}")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            (out / name).write_text((src / name).read_text())
    return out


def text_config_for_builder(config: dict) -> dict:
    """A VLM config.json -> its text model's config, as a transformers 4.57 LlamaForCausalLM reads it."""
    text = dict(config.get("text_config") or config)
    text["architectures"] = ["LlamaForCausalLM"] if text.get("model_type", "llama") == "llama" else text.get("architectures")
    text.setdefault("model_type", "llama")
    text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    text["torch_dtype"] = text.pop("dtype", config.get("dtype", "float32"))
    rope = text.get("rope_parameters")
    if isinstance(rope, dict):        # transformers 5 -> 4.x names
        text.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            text.setdefault("rope_scaling", rope)
    return text


def text_weight_name(key: str) -> str | None:
    for prefix in TEXT_PREFIXES:
        if key.startswith(prefix):
            return "model." + key[len(prefix):]
    if key in ("lm_head.weight", "language_model.lm_head.weight"):
        return "lm_head.weight"
    return None


class OrtGenAI:
    """spec["precision"]: int4 or int8 (the builder's -p)."""

    transformers = False      # peer_worker: transformers 5 reads the checkpoint as it is

    def __init__(self, spec: dict):
        self.spec = spec
        self.precision = spec["precision"]
        self.root = Path(spec["work_dir"]) / "ort-genai"
        self.out = self.root / self.precision

    def needs_export(self) -> bool:
        return not (self.out / "genai_config.json").is_file()

    def export(self) -> None:
        text = self.root / "text-checkpoint"
        if not (text / "model.safetensors").is_file():
            text_only_checkpoint(self.spec["checkpoint"], text.with_name("text-checkpoint.tmp"))
            os.replace(text.with_name("text-checkpoint.tmp"), text)
        tmp = self.out.with_name(self.out.name + ".tmp")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(text), "-o", str(tmp),
               "-p", self.precision, "-e", "cpu", "-c", str(self.root / "cache")]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        if done.returncode != 0 or not (tmp / "genai_config.json").is_file():
            raise RuntimeError("onnxruntime_genai.models.builder failed: " + " / ".join(done.stdout.splitlines()[-4:]))
        (tmp / "builder.log").write_text(done.stdout)
        write_weight_bytes(tmp)
        os.replace(tmp, self.out)

    def load(self) -> None:
        import onnxruntime_genai as og

        set_threads(self.out / "genai_config.json", self.spec.get("threads"))
        self.og = og
        self.model = og.Model(str(self.out))
        self.config = json.loads((self.out / "genai_config.json").read_text())
        self.prompt_ids = None

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.out.iterdir() if p.suffix in (".onnx", ".data"))

    def describe(self, settings: dict) -> dict:
        ids = self._prompt(settings.get("prompt", "describe the image."))
        options = self.config.get("model", {}).get("decoder", {}).get("session_options", {})
        note = (f"onnxruntime-genai {self.og.__version__} model builder, {self.precision.upper()} CPU "
                f"(MatMulNBits weight-only), {options.get('intra_op_num_threads', '?')} threads: DECODER ONLY (the "
                f"builder has no Idefics3/LLaVA class): no vision encoder; TTFT = prefill of the {len(ids)} token ids "
                "the VLM's processor makes for the prompt with one image (image tokens fed as text tokens) + the "
                "first greedy token; no vision and no end-to-end latency, so no 'x PyTorch' (the JSON's "
                "speedups_vs_torch.decode is the ratio that compares)")
        weights = self.out / WEIGHTS_FILE
        if not weights.is_file():          # an export older than this file: onnx is read in a child process
            subprocess.run([sys.executable, __file__, "--weight-bytes", str(self.out)], check=True,
                           stdout=subprocess.DEVNULL)
        return {"prompt_tokens": len(ids), "note": note, "session_options": options,
                "decoder_weight_bytes": json.loads(weights.read_text())["decoder_weight_bytes"]}

    def _prompt(self, prompt: str) -> list[int]:
        """The prompt's token ids, made once in a child process (transformers and torch would
        otherwise count in this worker's peak memory) and cached beside the export."""
        if self.prompt_ids is None:
            import hashlib

            path = self.root / f"prompt-{hashlib.sha256(prompt.encode()).hexdigest()[:12]}.json"
            if not path.is_file():
                done = subprocess.run([sys.executable, __file__, "--prompt-ids", self.spec["checkpoint"], prompt,
                                       self.spec["images"], str(path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace")
                if done.returncode != 0:
                    raise RuntimeError("counting the prompt's tokens failed: " + " / ".join(done.stdout.splitlines()[-3:]))
            self.prompt_ids = json.loads(path.read_text())
        return self.prompt_ids

    def _generator(self, length: int, new: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=length + new, min_length=length + new)
        return self.og.Generator(self.model, params)

    def generate(self, ids: list[int], n: int) -> tuple[float, float]:
        """(ttft_ms, e2e_ms) of exactly ``n`` greedy tokens after ``ids``."""
        import numpy as np

        g = self._generator(len(ids), n)
        t0 = time.perf_counter()
        g.append_tokens(np.asarray(ids, dtype=np.int32))
        g.generate_next_token()             # prefill ran in append_tokens; this picks token 1
        t1 = time.perf_counter()
        for _ in range(n - 1):
            g.generate_next_token()         # runs the model on the last token, picks the next
        t2 = time.perf_counter()
        del g
        return (t1 - t0) * 1e3, (t2 - t0) * 1e3

    def decode_at(self, position: int, steps: int) -> float:
        import numpy as np

        g = self._generator(position, steps + 1)
        g.append_tokens(np.full(position, 43, dtype=np.int32))     # cache filled with P tokens
        g.generate_next_token()
        t = time.perf_counter()
        for _ in range(steps):
            g.generate_next_token()
        seconds = time.perf_counter() - t
        del g
        return steps / seconds

    def round(self, batch: int, budget_s: float, settings: dict, first: bool) -> dict:
        out: dict = {"batch": batch, "vision_ms": [], "ttft_ms": [], "e2e_ms": [], "decode_tok_s": []}
        if batch != 1 or batch not in settings.get("generate_batches", [1]):
            return out
        n = int(settings.get("new_tokens", 32))
        ids = self._prompt(settings.get("prompt", "describe the image."))
        positions = settings.get("positions") or []
        steps = int(settings.get("position_steps", 16))
        if first:
            self.generate(ids, 2)
            for p in positions:
                self.decode_at(p, 2)
        # no end-to-end latency: without a vision encoder it would be compared with VLM rows that
        # encode an image (and be the row's headline "x PyTorch"); TTFT and decode stand alone
        t0 = time.perf_counter()
        while not out["ttft_ms"] or time.perf_counter() - t0 < budget_s * 0.7:
            ttft, e2e = self.generate(ids, n)
            out["ttft_ms"].append(ttft)
            if n > 1:
                out["decode_tok_s"].append((n - 1) / ((e2e - ttft) / 1e3))
        out["prompt_tokens"] = len(ids)
        if positions and steps > 1:
            out["decode_tok_s_at"] = {str(p): [self.decode_at(p, steps)] for p in positions}
        return out


WEIGHTS_FILE = "edgevl-weights.json"


def decode_weight_bytes(model_onnx: Path) -> int:
    """Bytes of the initializers one decode step reads: all but those only a Gather consumes (an
    embedding table is read one row per token; a table the LM head shares, as INT4 ties it through
    GatherBlockQuantized + MatMulNBits, is read whole and counts)."""
    import onnx

    model = onnx.load(str(model_onnx), load_external_data=False)
    consumers: dict[str, set] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        ops = consumers.get(init.name, set())
        if ops and ops <= {"Gather"}:
            continue
        length = {e.key: e.value for e in init.external_data}.get("length")
        total += int(length) if length else len(init.raw_data)
    return total


def write_weight_bytes(out: Path) -> None:
    (Path(out) / WEIGHTS_FILE).write_text(json.dumps({"decoder_weight_bytes": decode_weight_bytes(Path(out) / "model.onnx")}))


def set_threads(config_path: Path, threads) -> None:
    if not threads:
        return
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != int(threads):
        options["intra_op_num_threads"] = int(threads)
        options["inter_op_num_threads"] = 1
        config_path.write_text(json.dumps(config, indent=4))


def vlm_prompt_ids(checkpoint: str, prompt: str, images_npy: str) -> list[int]:
    """The token ids the checkpoint's processor makes for ``prompt`` with one scene image, image
    splitting off, as edgevl's and PyTorch's rows see it (benchmarks/subject_hf.py)."""
    import numpy as np

    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(checkpoint)
    except (ImportError, ValueError, AttributeError, TypeError):
        # SmolVLMProcessor insists on a video processor, which needs torchvision (MEASURED.md 11);
        # this runs on edgevl's python, so edgevl's image-only processor is at hand
        from edgevl.exporters.families.smolvlm import image_only_processor

        processor = image_only_processor(Path(checkpoint))
    ip = getattr(processor, "image_processor", None)
    kwargs = {"do_image_splitting": False} if hasattr(ip, "do_image_splitting") else {}
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = np.load(images_npy)[0]
    inputs = processor(text=[text], images=[[image]], return_tensors="np", **kwargs)
    return [int(t) for t in inputs["input_ids"][0]]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--weight-bytes":
        write_weight_bytes(Path(sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) == 6 and sys.argv[1] == "--prompt-ids":
        ids = vlm_prompt_ids(sys.argv[2], sys.argv[3], sys.argv[4])
        tmp = Path(sys.argv[5] + ".tmp")
        tmp.write_text(json.dumps(ids))
        os.replace(tmp, sys.argv[5])
        sys.exit(0)
    print(__doc__)
    sys.exit(2)
