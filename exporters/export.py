"""`edgevl export`: a checkpoint -> a validated FP32 bundle of ONNX parts.

Steps: resolve the family, export the three parts, check each part against PyTorch in ONNX
Runtime (max abs diff and cosine, fail loudly past the tolerance), check that greedy tokens
through the ONNX parts equal the family's own PyTorch generate(), write the manifest and the
parity report, and commit the bundle atomically. Time and peak memory are printed and kept.
"""

from __future__ import annotations

import datetime as _dt
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from edgevl.bundle import Bundle, BundleWriter
from edgevl.errors import ParityError
from edgevl.exporters.families.base import ExportableVLM, resolve_family
from edgevl.exporters.onnx_export import (OPSET, DecoderForExport, decoder_extra_inputs, decoder_io_names,
                                          export_decoder, export_embed, export_vision, io_spec)
from edgevl.runtimes.compare import Comparator, FnRunner, PartReport

DEFAULT_ATOL = 1e-4
GREEDY_TOKENS = 16


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sample_images(n: int = 3) -> list[np.ndarray]:
    """Held-out scenes of the synthetic world, as RGB arrays (any family can take them)."""
    from edgevl.data.world import make_scene

    return [make_scene("test", i, seed=12345).image() for i in range(n)]


def load_exportable(model: str | Path, image_size: tuple[int, int] | None = None) -> ExportableVLM:
    """``image_size`` (W, H): the fixed image size of a family that resizes per image (Qwen2-VL);
    refused for families whose image size is the checkpoint's own."""
    from edgevl.errors import UnsupportedArchitecture

    family, path = resolve_family(model)
    if image_size is None:
        return family().load(path)
    if "image_size" not in getattr(family, "options", ()):
        raise UnsupportedArchitecture(f"{model}: --image-size is not supported for the {family.name} family (its "
                                      "image size is fixed by the checkpoint's processor); leave it out")
    return family(image_size=tuple(image_size)).load(path)


# -- parity ------------------------------------------------------------------------------------
def _torch_runner(module, input_names, output_names, name="pytorch"):
    def run(feeds):
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names]
        with torch.no_grad():
            out = module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().float().numpy() for n, o in zip(output_names, out)}
    return FnRunner(run, name)


def decoder_feeds(vlm: ExportableVLM, images: list[np.ndarray]) -> list[dict]:
    """Realistic decoder inputs: a real prompt prefill, a decode step on its cache, and a
    batch of two rows at different positions."""
    ref = vlm.reference
    ids = torch.tensor([ref.input_ids(vlm.sample_prompts[0], 1)])
    with torch.no_grad():
        image_embeds = vlm.vision(ref.pixels(images[:1]))
        embeds = vlm.embed(ids)
        is_image = ids[0] == vlm.prompt["image_token_id"]
        embeds[0, is_image] = image_embeds.reshape(-1, embeds.shape[-1])[: int(is_image.sum())]
    spec = vlm.decoder.spec
    t = embeds.shape[1]
    capacity = max(64, 1 << (t + 8).bit_length())

    def empty(batch):
        return [np.zeros((batch, spec.n_kv_heads, capacity, spec.head_dim), np.float32)
                for _ in range(2 * spec.n_layers)]

    prefill = {"inputs_embeds": embeds.numpy(), "past_len": np.zeros(1, np.int64)}
    extras = decoder_extra_inputs(spec)
    names_in, _ = decoder_io_names(spec.n_layers, extras)
    past_names = names_in[2:2 + 2 * spec.n_layers]
    prefill.update(dict(zip(past_names, empty(1))))
    delta = 0
    if spec.mrope_section:      # 3-D positions as the runtime computes them (runtimes/mrope.py)
        from edgevl.runtimes.mrope import MRoPEPositions

        prefill["position_ids"], deltas = MRoPEPositions(vlm.manifest_extra["mrope"]).prefill(ids.numpy())
        delta = int(deltas[0])
    if "image_span" in extras:      # the prompt's image block, as the runtime computes it
        from edgevl.runtimes.image_span import prompt_spans
        prefill["image_span"] = prompt_spans(ids.numpy(), vlm.prompt["image_token_id"], np.zeros(1, np.int64))
    with torch.no_grad():
        out = DecoderForExport(vlm.decoder)(*[torch.from_numpy(prefill[n]) for n in names_in])
    cache = [c.copy() for c in (prefill[n] for n in past_names)]
    for c, present in zip(cache, out[1:]):
        c[:, :, :t] = present.numpy()
    step_embed = vlm.embed(torch.tensor([[int(out[0].argmax())]])).detach().numpy()
    decode = {"inputs_embeds": step_embed, "past_len": np.array([t], np.int64), **dict(zip(past_names, cache))}
    batch2 = {"inputs_embeds": np.concatenate([step_embed, step_embed * 0.5]),
              "past_len": np.array([t, t // 2], np.int64),
              **{n: np.concatenate([c, c]) for n, c in zip(past_names, cache)}}
    if spec.mrope_section:
        decode["position_ids"] = np.full((3, 1, 1), t + delta, np.int64)
        rows = np.array([t, t // 2], np.int64) + delta
        batch2["position_ids"] = np.ascontiguousarray(np.broadcast_to(rows[None, :, None], (3, 2, 1)))
    if "image_span" in extras:      # decode steps: empty spans
        decode["image_span"], batch2["image_span"] = np.zeros((1, 2), np.int64), np.zeros((2, 2), np.int64)
    return [prefill, decode, batch2]


def check_parts(vlm: ExportableVLM, tmp: Path, files: dict, images, atol: float) -> list[PartReport]:
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    comparator = Comparator(atol=atol)
    ref = vlm.reference
    pixels1 = ref.pixels(images[:1]).numpy()
    pixels3 = ref.pixels(images).numpy()
    ids = np.asarray([ref.input_ids(p, 1) for p in vlm.sample_prompts[:1]], np.int64)
    names_in, names_out = decoder_io_names(vlm.decoder.spec.n_layers, decoder_extra_inputs(vlm.decoder.spec))
    plans = [
        ("vision", vlm.vision, ["pixel_values"], ["image_embeds"], [{"pixel_values": pixels1}, {"pixel_values": pixels3}]),
        ("embed", vlm.embed, ["input_ids"], ["inputs_embeds"], [{"input_ids": ids}]),
        ("decoder", DecoderForExport(vlm.decoder), names_in, names_out, decoder_feeds(vlm, images)),
    ]
    reports = []
    for part, module, ins, outs, feeds in plans:
        with OnnxRuntimeRunner(tmp / files[part]) as runner:
            report = comparator.compare(part, _torch_runner(module, ins, outs), runner, feeds,
                                        ref_name="pytorch", cand_name="onnxruntime")
        reports.append(report)
    return reports


def check_greedy(vlm: ExportableVLM, bundle: Bundle, images, n_tokens: int = GREEDY_TOKENS) -> list[dict]:
    """Greedy tokens through the ONNX parts (the runtime itself) vs the family's PyTorch model."""
    from edgevl.runtimes.engine import Engine
    from edgevl.runtimes.generation import stream_tokens
    from edgevl.runtimes.sampling import SamplingParams

    engine = Engine(bundle, "onnxruntime")
    results = []
    params = SamplingParams(max_new_tokens=n_tokens)
    try:
        for i, image in enumerate(images):
            prompt = vlm.sample_prompts[i % len(vlm.sample_prompts)]
            expected = [int(t) for t in vlm.reference.generate([image], prompt, n_tokens)]
            ids = np.asarray(vlm.reference.input_ids(prompt, 1), np.int64)
            pixels = vlm.reference.pixels([image]).numpy()
            got = list(stream_tokens(engine, ids, engine.encode_images(pixels), params))
            results.append({"image": i, "prompt": prompt, "pytorch": expected, "onnx": got, "match": got == expected})
    finally:
        engine.close()
    return results


# -- the command -------------------------------------------------------------------------------
def export_model(model: str | Path, out: str | Path, force: bool = False, atol: float = DEFAULT_ATOL,
                 check_tokens: bool = True, log=print, image_size: tuple[int, int] | None = None) -> Bundle:
    t_start = time.perf_counter()
    vlm = load_exportable(model, image_size)
    log(f"export: {vlm.name} ({vlm.family}, {vlm.architecture}) from {vlm.source}")
    writer = BundleWriter(out, force=force)
    try:
        files = {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"}
        timings = {}
        for part, fn, args in (("vision", export_vision, (vlm.vision, vlm.pixel_shape)),
                               ("embed", export_embed, (vlm.embed,)),
                               ("decoder", export_decoder, (vlm.decoder,))):
            t = time.perf_counter()
            fn(*args, writer.file(files[part]))
            timings[part] = round(time.perf_counter() - t, 2)
            log(f"  exported {part:<8} in {timings[part]:.1f} s")
        writer.copy_in(vlm.tokenizer_file, "tokenizer.json")
        for rel, src in vlm.extra_files.items():
            writer.copy_in(src, rel)
        writer.manifest.update(build_manifest(vlm, writer.tmp, files))
        images = sample_images(3)
        reports = check_parts(vlm, writer.tmp, files, images, atol)
        for r in reports:
            log(f"  parity {r.summary()}")
        greedy = []
        if check_tokens:
            greedy = check_greedy(vlm, Bundle(writer.tmp, writer.manifest), images)
            n_ok = sum(g["match"] for g in greedy)
            log(f"  greedy tokens: {n_ok}/{len(greedy)} prompts identical to PyTorch ({GREEDY_TOKENS} new tokens)")
        elapsed = time.perf_counter() - t_start
        parity = {"atol": atol, "parts": [r.to_dict() for r in reports], "greedy": greedy,
                  "export_seconds": round(elapsed, 2), "part_seconds": timings, "peak_rss_mb": round(peak_rss_mb(), 1)}
        writer.write_json("parity.json", parity)
        writer.manifest["reports"] = {"parity": "parity.json"}
        writer.manifest["provenance"].update({"export_seconds": round(elapsed, 2), "peak_rss_mb": round(peak_rss_mb(), 1)})
        for r in reports:
            Comparator.require(r)
        bad = [g for g in greedy if not g["match"]]
        if bad:
            g = bad[0]
            raise ParityError(f"greedy tokens through ONNX differ from PyTorch for {len(bad)} prompt(s); first: "
                              f"prompt {g['prompt']!r}, pytorch {g['pytorch']}, onnx {g['onnx']}")
        bundle = writer.commit()
    except BaseException:
        writer.abort()
        raise
    log(f"export: wrote {bundle.path} in {time.perf_counter() - t_start:.1f} s, peak memory {peak_rss_mb():.0f} MB")
    return bundle


def build_manifest(vlm: ExportableVLM, root: Path, files: dict) -> dict:
    import onnx

    from edgevl import __version__

    parts = {}
    for part, rel in files.items():
        inputs, outputs = io_spec(root / rel)
        parts[part] = {"onnx": rel, "inputs": inputs, "outputs": outputs}
    spec = vlm.decoder.spec
    variants = spec.variants()
    embed_scale = getattr(getattr(vlm.embed, "embedding", None), "scalar_embed_scale", 1.0)   # HF Gemma
    if float(embed_scale) != 1.0:
        variants["embed_scale"] = float(embed_scale)          # applied in the embed part, recorded here
    manifest = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": vlm.name, "family": vlm.family, "architecture": vlm.architecture, "source": vlm.source},
        "precision": "fp32",
        "target": "onnxruntime",
        "parts": parts,
        "decoder": {"n_layers": spec.n_layers, "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
                    "hidden_dim": spec.hidden_dim, "vocab_size": spec.vocab_size, "max_position": vlm.max_position,
                    "kv_dtype": "float32", **({"variants": variants} if variants else {})},
        "preprocess": vlm.preprocess,
        "tokenizer": {"file": "tokenizer.json", **vlm.tokenizer},
        "prompt": vlm.prompt,
        "generation": vlm.generation,
        "quantization": None,
        "provenance": {"exporter": "torch.onnx (TorchScript)", "opset": OPSET, "torch": torch.__version__,
                       "onnx": onnx.__version__, "edgevl": __version__, "host": platform.node(),
                       "python": platform.python_version()},
    }
    manifest.update(vlm.manifest_extra)
    return manifest
