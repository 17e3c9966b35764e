"""A benchmark worker for peer tools, run with benchmarks/.peers-venv's python.

It speaks the same JSON-lines protocol as edgevl.benchmarks.worker (see that file) but imports
nothing of edgevl: the peers venv holds optimum-intel, openvino-genai and optimum-onnx with the
transformers they pin, not edgevl. It measures what the peers expose the same way for all:

- time to first token = processor + ``generate(max_new_tokens=1)``;
- end to end = processor + ``generate`` of exactly N tokens (EOS ignored), greedy;
- decode tokens/s = (N - 1) / (end to end - time to first token), pairwise.

The vision encoder alone is not timed (the peers do not expose it the same way); those cells
stay empty. Exports are cached in the spec's ``work_dir`` so only the first run pays for them.

Peers with measures of their own live beside this file and define ``round`` (and optionally
``describe``, ``size_bytes``, ``peak_rss_mb``): llama_cpp_peer.py (llama.cpp's binaries; run
with edgevl's own python, as it needs no peers venv) and ort_genai_peer.py (ONNX Runtime GenAI,
decoder only).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

PROMPT_DEFAULT = "describe the image."


def peak_rss_mb() -> float:
    """VmHWM of this process image (ru_maxrss would include the forking parent's; see worker.py)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def scene_images(spec: dict, batch: int):
    """The same held-out scenes edgevl's workers use, saved by the orchestrator as .npy (the
    peers venv has no edgevl to draw them)."""
    import numpy as np

    images = np.load(spec["images"])
    return [images[i % len(images)] for i in range(batch)]


def compat_checkpoint(src: str, work_dir: str) -> Path:
    """The checkpoint as the peers' older transformers can read it, and without image splitting.

    A link farm of ``src`` in ``work_dir`` with two files rewritten: tokenizer_config.json
    (transformers 5 writes ``tokenizer_class: TokenizersBackend`` and a list of
    ``extra_special_tokens``, which 4.57 cannot load) and processor_config.json
    (``do_image_splitting: false``: edgevl's bundles and PyTorch row encode the processor's
    global view only, so the peers must too, or they would encode up to 17 crops per image).
    """
    src, out = Path(src), Path(work_dir) / "checkpoint-compat"
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        link = out / f.name
        if f.name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
            data = json.loads(f.read_text())
            if f.name == "tokenizer_config.json":
                if data.get("tokenizer_class") == "TokenizersBackend":
                    data["tokenizer_class"] = "PreTrainedTokenizerFast"
                data.pop("backend", None)
                extra = data.pop("extra_special_tokens", None)
                if isinstance(extra, list):
                    data["additional_special_tokens"] = extra
                elif isinstance(extra, dict):
                    data["extra_special_tokens"] = extra
            else:
                ip = data.get("image_processor", data)
                if "do_image_splitting" in ip:
                    ip["do_image_splitting"] = False
            if link.is_symlink() or link.exists():
                link.unlink()
            link.write_text(json.dumps(data, indent=2))
        elif not (link.is_symlink() or link.exists()):
            link.symlink_to(f.resolve())
    return out


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class OptimumIntel:
    def __init__(self, spec: dict):
        self.spec = spec
        self.int8 = spec["precision"].startswith("int8")
        self.ov_dir = Path(spec["work_dir"]) / ("ov-int8" if self.int8 else "ov-fp32")

    def ov_config(self) -> dict:
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.spec.get("threads"):
            config["INFERENCE_NUM_THREADS"] = str(self.spec["threads"])
        return config

    def needs_export(self) -> bool:
        return not (self.ov_dir / "config.json").is_file()

    def export(self) -> None:
        from optimum.intel import OVModelForVisualCausalLM

        if (self.ov_dir / "config.json").is_file():
            return
        kwargs = {"load_in_8bit": True} if self.int8 else {"load_in_8bit": False}
        model = OVModelForVisualCausalLM.from_pretrained(self.spec["checkpoint"], export=True, compile=False, **kwargs)
        tmp = self.ov_dir.with_name(self.ov_dir.name + ".tmp")
        model.save_pretrained(tmp)
        from transformers import AutoProcessor

        AutoProcessor.from_pretrained(self.spec["checkpoint"]).save_pretrained(tmp)
        os.replace(tmp, self.ov_dir)

    def load(self) -> None:
        from optimum.intel import OVModelForVisualCausalLM
        from transformers import AutoProcessor

        self.model = OVModelForVisualCausalLM.from_pretrained(self.ov_dir, ov_config=self.ov_config())
        self.processor = AutoProcessor.from_pretrained(self.spec["checkpoint"])

    def inputs(self, images, prompt):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.processor(text=[text] * len(images), images=[[im] for im in images], return_tensors="pt")

    def generate(self, images, prompt, n) -> int:
        inputs = self.inputs(images, prompt)
        self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return int(inputs["input_ids"].shape[1])


class OpenVINOGenAI(OptimumIntel):
    def load(self) -> None:
        import openvino_genai as ov_genai

        self.pipe = ov_genai.VLMPipeline(str(self.ov_dir), "CPU", **self.ov_config())

    def generate(self, images, prompt, n) -> int:
        import openvino as ov
        import openvino_genai as ov_genai

        config = ov_genai.GenerationConfig()
        config.max_new_tokens, config.min_new_tokens, config.ignore_eos = n, n, True
        self.pipe.start_chat()           # a fresh chat each time: no prompt reuse (MEASURED.md gotcha 4)
        try:
            self.pipe.generate(prompt, images=[ov.Tensor(im[None]) for im in images], generation_config=config)
        finally:
            self.pipe.finish_chat()
        return 0


class OptimumORT(OptimumIntel):
    def __init__(self, spec: dict):
        super().__init__(spec)
        self.ort_dir = Path(spec["work_dir"]) / "onnx"

    def needs_export(self) -> bool:
        return True                      # the export step also finds out whether optimum-onnx can run it

    def export(self) -> None:
        cls = self._cls()
        if not (self.ort_dir / "config.json").is_file():
            model = cls.from_pretrained(self.spec["checkpoint"], export=True)
            model.save_pretrained(self.ort_dir)

    def _cls(self):
        import optimum.onnxruntime as ort_mod

        for name in ("ORTModelForImageTextToText", "ORTModelForVisualCausalLM"):
            if hasattr(ort_mod, name):
                return getattr(ort_mod, name)
        from importlib.metadata import version as _version

        version = _version("optimum-onnx")
        raise RuntimeError(f"optimum-onnx {version} cannot run this model: it has no decoder-only VLM class "
                           "(ORTModelForImageTextToText / ORTModelForVisualCausalLM); its ORTModelForVision2Seq is "
                           "for encoder-decoder models, not Idefics3/SmolVLM/LLaVA")

    def load(self) -> None:
        from transformers import AutoProcessor

        self.model = self._cls().from_pretrained(self.ort_dir)
        self.processor = AutoProcessor.from_pretrained(self.spec["checkpoint"])


PEERS = {"optimum-intel": OptimumIntel, "optimum-intel-int8": OptimumIntel, "openvino-genai": OpenVINOGenAI,
         "optimum-onnxruntime": OptimumORT,
         # modules beside this file, imported when asked for (llama_cpp_peer runs on edgevl's python)
         "llama-cpp-q8_0": "llama_cpp_peer:LlamaCpp", "llama-cpp-q4_0": "llama_cpp_peer:LlamaCpp",
         "ort-genai-int4": "ort_genai_peer:OrtGenAI", "ort-genai-int8": "ort_genai_peer:OrtGenAI"}


def peer_class(name: str):
    cls = PEERS[name]
    if isinstance(cls, str):
        import importlib

        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)
        module, _, attr = cls.partition(":")
        cls = getattr(importlib.import_module(module), attr)
    return cls


class Worker:
    def load(self, msg):
        self.spec, self.settings = msg["subject"], msg.get("settings", {})
        cls = peer_class(self.spec["peer"])
        if getattr(cls, "transformers", True):
            if self.spec.get("threads"):
                import torch

                torch.set_num_threads(int(self.spec["threads"]))
            self.spec["checkpoint"] = str(compat_checkpoint(self.spec["checkpoint"], self.spec["work_dir"]))
        self.peer = cls(self.spec)
        t = time.perf_counter()
        # export in a child process: its memory (torch tracing) is not this variant's peak
        done = None
        if self.peer.needs_export():
            done = subprocess.run([sys.executable, __file__, "--export", json.dumps(self.spec)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done is not None and done.returncode != 0:
            raise RuntimeError(f"{self.spec['peer']} export failed: " + (done.stderr.strip().splitlines() or ["?"])[-1])
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        self.peer.load()
        load_ms = (time.perf_counter() - t) * 1e3
        if hasattr(self.peer, "size_bytes"):
            size = self.peer.size_bytes()
        else:
            size = dir_size(getattr(self.peer, "ort_dir", None) or self.peer.ov_dir)
        facts = {"load_ms": load_ms, "export_s": round(export_s, 1), "size_bytes": size, "max_position": None,
                 "pid": os.getpid()}
        if hasattr(self.peer, "describe"):
            facts.update(self.peer.describe(self.settings))
        return {"facts": facts}

    def round(self, msg):
        batch, budget = int(msg["batch"]), float(msg.get("budget_s", 1.0))
        if hasattr(self.peer, "round"):             # a peer with its own measures (llama.cpp, ORT GenAI)
            first = batch not in getattr(self, "seen", set())
            self.seen = getattr(self, "seen", set()) | {batch}
            return {"samples": self.peer.round(batch, budget, self.settings, first)}
        n = int(self.settings.get("new_tokens", 32))
        prompt = self.settings.get("prompt", PROMPT_DEFAULT)
        images = scene_images(self.spec, batch)
        if batch not in getattr(self, "seen", set()):
            self.seen = getattr(self, "seen", set()) | {batch}
            self.peer.generate(images, prompt, 2)                 # warm-up
        out = {"batch": batch, "vision_ms": [], "ttft_ms": [], "e2e_ms": [], "decode_tok_s": []}
        if batch not in self.settings.get("generate_batches", [1]):
            return {"samples": out}
        spent = 0.0
        while not out["e2e_ms"] or spent < budget:
            t = time.perf_counter()
            prompt_tokens = self.peer.generate(images, prompt, 1)
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            self.peer.generate(images, prompt, n)
            e2e = time.perf_counter() - t
            spent += ttft + e2e
            out["ttft_ms"].append(ttft * 1e3)
            out["e2e_ms"].append(e2e * 1e3)
            if e2e > ttft and n > 1:
                out["decode_tok_s"].append((n - 1) * batch / (e2e - ttft))
            out["prompt_tokens"] = prompt_tokens or None
        return {"samples": out}

    def peak_rss_mb(self) -> float:
        """This process's peak, or the peer's own where it runs the model in child processes."""
        peer = getattr(self, "peer", None)
        return peer.peak_rss_mb() if hasattr(peer, "peak_rss_mb") else peak_rss_mb()

    def finish(self, msg):
        return {"accuracy": None, "overhead": None, "process_peak_rss_mb": self.peak_rss_mb()}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--export":
        spec = json.loads(sys.argv[2])
        peer_class(spec["peer"])(spec).export()
        return 0
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg.get("cmd") == "quit":
            break
        try:
            reply = {"load": worker.load, "round": worker.round, "finish": worker.finish,
                     "rss": lambda m: {"peak_rss_mb": worker.peak_rss_mb()}}[msg["cmd"]](msg)
            reply["ok"] = True
        except Exception as e:
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        proto.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
