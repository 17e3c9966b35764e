"""Scale check for Qwen2.5-VL: a random-weight checkpoint with Qwen2.5-VL-3B's vision tower and
decoder widths (fewer decoder layers, see LAYERS), exported, quantized (int8 weight-only) and
run; prints one JSON result (export time, peak memory per stage, end-to-end speed against
transformers eager).

    flock /tmp/edgevl-heavy.lock nice -n 19 python benchmarks/qwen2_5_vl_shaped.py \
        --cache ~/.cache/edgevl-bench --json-out benchmarks/results/qwen2_5_vl_shaped.json

Shapes (Qwen/Qwen2.5-VL-3B-Instruct's config): vision 32 blocks, hidden 1280, MLP 3420, 16 heads,
patch 14, merge 2, window 112, full-attention blocks 7/15/23/31, out 2048 (~670 M parameters);
decoder hidden 2048, 16 heads / 2 KV heads, MLP 11008, vocab 151936, tied embeddings, rope theta
1e6, mrope_section 16/24/24. The real decoder has 36 layers (~3 B with the tower, 12 GB in
float32); this one has ``LAYERS`` so that PyTorch, the ONNX parts and the ONNX Runtime sessions
of the parity checks fit in this machine's 24 GB beside another job. Images are 448x448 (the
default size edgevl picks for this processor: 256 image tokens).

Every stage runs in its own process so each peak RSS is that stage's alone: building the
checkpoint, the FP32 export (with its parity and greedy checks), the int8 weight-only build,
edgevl's end-to-end answer on ONNX Runtime (fp32 and int8-wo), and transformers' eager
``generate`` on the same image and prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BUILD_VERSION = 1
NAME = "qwen2_5_vl-3b-shaped"
LAYERS = 4
IMAGE_SIZE = (448, 448)          # W x H
NEW_TOKENS = 32
PROMPT = "describe the image."
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
              hidden_act="silu", tokens_per_second=2)
TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=LAYERS, num_attention_heads=16,
            num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
            tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                       "mrope_section": [16, 24, 24]})
# Qwen2.5-VL's chat template, its image part and default system turn (no tools, no video)
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' }}{% for c in message['content'] %}"
                 "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
                 "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]


def build(out: Path) -> Path:
    import torch
    import transformers as tf

    from edgevl.benchmarks.shaped import bpe_tokenizer

    tok = bpe_tokenizer(SPECIALS)
    tok.eos_token = "<|im_end|>"
    ids = tok.convert_tokens_to_ids
    text = dict(TEXT, bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<pad>"))
    tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    config = tf.Qwen2_5_VLConfig(vision_config=VISION, text_config=text, tie_word_embeddings=True, **tokens)
    torch.manual_seed(25)
    model = tf.Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<pad>")
    model.save_pretrained(out)
    tf.Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136,
                                max_pixels=12845056).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return out


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _image():
    from edgevl.data.world import make_scene

    return make_scene("test", 3, seed=12345).image()


def stage(name: str, args) -> dict:
    """One stage, in this process -> its result (the parent runs each in a child)."""
    t0 = time.perf_counter()
    if name == "checkpoint":
        from edgevl.benchmarks.shaped import cached_checkpoint

        path = cached_checkpoint(args.cache / "checkpoints", NAME, BUILD_VERSION, build)
        return {"checkpoint": str(path), "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": _peak_mb()}
    ckpt = args.cache / "checkpoints" / f"{NAME}-v{BUILD_VERSION}"
    fp32, wo = args.cache / "bundles" / f"{NAME}-fp32", args.cache / "bundles" / f"{NAME}-int8-wo"
    if name == "export":
        from edgevl.exporters.export import export_model

        bundle = export_model(ckpt, fp32, force=True, image_size=IMAGE_SIZE, log=lambda *a: print(*a, file=sys.stderr))
        parity = bundle.report("parity") or {}
        return {"seconds": round(time.perf_counter() - t0, 1), "seconds_after_imports": parity.get("export_seconds"),
                "part_seconds": parity.get("part_seconds"), "peak_rss_mb": _peak_mb(),
                "parity_max_abs": {p["part"]: max(o["max_abs"] for o in p["outputs"]) for p in parity.get("parts", [])},
                "greedy_identical": f"{sum(g['match'] for g in parity['greedy'])}/{len(parity['greedy'])}",
                "bundle_mb": round(sum(f["bytes"] for f in bundle.manifest["files"].values()) / 1e6, 1)}
    if name == "quantize":
        from edgevl.bundle import load_bundle
        from edgevl.exporters.build import finish
        from edgevl.exporters.quantize.recipes import WeightOnlyRecipe, default_block_size, weight_only_backends
        from edgevl.exporters.quantize.weight_only import weight_only_bundle

        backends = weight_only_backends("onnxruntime")
        recipe = WeightOnlyRecipe(bits=8, block_size=default_block_size(backends), backends=backends)
        staged = weight_only_bundle(load_bundle(fp32), args.cache / "bundles" / ".wo-stage", recipe, force=True,
                                    eval_scenes=4, accept_loss=True, log=lambda *a: print(*a, file=sys.stderr))
        bundle = finish(staged, wo, "onnxruntime", "int8-wo", True, lambda *a: print(*a, file=sys.stderr))
        report = bundle.report("accuracy") or {}
        return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": _peak_mb(),
                "bundle_mb": round(sum(f["bytes"] for f in bundle.manifest["files"].values()) / 1e6, 1),
                "decoder_vs_fp32": report.get("parts", {}).get("decoder", {}).get("onnxruntime"),
                "answers_identical_to_fp32": report.get("tasks", {}).get("backends", {}).get("onnxruntime", {})
                .get("agreement")}
    if name.startswith("edgevl-"):
        import edgevl

        path = fp32 if name == "edgevl-fp32" else wo
        with edgevl.load(path, backend="onnxruntime", verbose=False) as model:
            model.generate(_image(), PROMPT, channels="rgb", max_new_tokens=2)          # warm-up
            t = time.perf_counter()
            result = model.generate(_image(), PROMPT, channels="rgb", max_new_tokens=NEW_TOKENS)
            seconds = time.perf_counter() - t
        return {"tokens": list(result.tokens), "end_to_end_s": round(seconds, 2), "peak_rss_mb": _peak_mb(),
                "timings_ms": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in result.timings_ms.items()
                               if not isinstance(v, list)}}
    if name == "transformers":
        import torch

        from edgevl.exporters.export import load_exportable

        torch.set_num_threads(os.cpu_count() or 1)
        vlm = load_exportable(ckpt, IMAGE_SIZE)
        ref = vlm.reference
        ref.model.config._attn_implementation = "eager"
        for sub in (ref.model.model.visual.config, ref.model.model.language_model.config):
            sub._attn_implementation = "eager"
        ref.generate([_image()], PROMPT, 2)                                             # warm-up
        t = time.perf_counter()
        tokens = ref.generate([_image()], PROMPT, NEW_TOKENS)
        return {"tokens": tokens, "end_to_end_s": round(time.perf_counter() - t, 2), "peak_rss_mb": _peak_mb()}
    raise SystemExit(f"unknown stage {name!r}")


STAGES = ("checkpoint", "export", "quantize", "edgevl-fp32", "edgevl-int8-wo", "transformers")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgevl-bench")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--stage", choices=STAGES, help="run one stage here (the parent runs each in a child)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    args = parser.parse_args(argv)
    if args.stage:
        print("RESULT " + json.dumps(stage(args.stage, args)))
        return {}
    from edgevl.benchmarks.machine import machine_info
    from edgevl.benchmarks.shaped import emit

    env = dict(os.environ)
    result = {"benchmark": f"{NAME}: Qwen2.5-VL-3B vision tower and decoder widths, {LAYERS} of 36 decoder layers, "
                           f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} images, {NEW_TOKENS} new tokens", "stages": {}}
    for name in args.stages.split(","):
        t = time.perf_counter()
        load_before = [round(x, 2) for x in os.getloadavg()]
        run = subprocess.run([sys.executable, __file__, "--stage", name, "--cache", str(args.cache)], env=env,
                             stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
        result["stages"][name] = json.loads(lines[-1][7:]) if lines and run.returncode == 0 else \
            {"failed": run.returncode, "wall_s": round(time.perf_counter() - t, 1)}
        result["stages"][name]["load_average_before_after"] = [load_before, [round(x, 2) for x in os.getloadavg()]]
        print(name, json.dumps(result["stages"][name]), file=sys.stderr, flush=True)
    s = result["stages"]
    if "transformers" in s and "end_to_end_s" in s["transformers"]:
        for row in ("edgevl-fp32", "edgevl-int8-wo"):
            if "end_to_end_s" in s.get(row, {}):
                hf_s = s["transformers"]["end_to_end_s"]
                s[row]["speedup_vs_transformers_eager"] = round(hf_s / s[row]["end_to_end_s"], 2)
                s[row]["tokens_equal_transformers"] = s[row]["tokens"] == s["transformers"]["tokens"]
    result["machine"] = machine_info()
    return emit(result, args.json_out)


if __name__ == "__main__":
    main()
