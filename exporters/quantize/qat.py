"""`edgevl qat`: quantization-aware fine-tuning of edgevl-tiny with NNCF, exported as Q/DQ ONNX.

Recipe (MEASURED.md item 8, NNCF 3.4 + torch 2.13):
1. export the FP32 bundle (the reference for calibration feeds and the accuracy report);
2. ``nncf.quantize(part, nncf.Dataset(real feeds), model_type=TRANSFORMER)`` on the vision part
   (encoder + projector) and on the decoder: fake quantizers with trainable scales, initialised
   from the same realistic feeds PTQ uses (decoder: prefill + decode steps with real KV caches);
   ``overflow_fix=ENABLE`` keeps weights in a 7-bit range, like PTQ's ``reduce_range``, so the
   integer kernels of non-VNNI x86 CPUs do not saturate;
3. a bounded training loop on the model's own training data (edgevl.train.make_batch over
   training_qas of fresh world scenes, loss on answer tokens, as edgevl.train does). The decoder is trained
   through the same cache path the export traces (an empty, zero-capacity KV cache), so every
   fake quantizer the ONNX graph will carry is in the training graph too;
4. ``nncf.strip(..., strip_format=NATIVE)`` (imports torchao) -> standard QuantizeLinear /
   DequantizeLinear, exported with the normal TorchScript path (exporters/onnx_export.py);
   dynamo export fails on fake-quant modules;
5. the bundle gets the same manifest conventions as PTQ, a parity report (ONNX Runtime vs the
   PyTorch fake-quant model) and accuracy.json vs the FP32 bundle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgevl.bundle import Bundle
from edgevl.errors import QuantizationError
from edgevl.exporters.quantize.recipes import QATRecipe


def decoder_args(feed: dict, n_layers: int):
    """A recorded decoder feed (numpy, runtime names) -> Decoder.forward's positional arguments."""
    import torch

    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
    keys = [t[f"past_key.{i}"] for i in range(n_layers)]
    values = [t[f"past_value.{i}"] for i in range(n_layers)]
    args = (t["inputs_embeds"], keys, values, t["past_len"], True)
    return args + (t["image_span"],) if "image_span" in t else args      # an image_bidirectional decoder


def fake_quantize(vision, decoder, feeds: dict, recipe: QATRecipe):
    """NNCF fake quantization of both parts, ranges initialised on the realistic feeds.

    The decoder's attention matmuls (activation x activation, incl. the KV cache) stay float in
    QAT: NNCF keys its hooks by op name and per-scope call counter, and the TorchScript export
    traces the decoder's shape arithmetic (``rep * t`` in the attention reshape) as tensor ops,
    which shifts the counters: the quantizer meant for a query tensor then lands on a shape
    (seen as "fake_quantize ... not implemented for 'Long'"). Linear layers' hooks are keyed by
    module and are stable, so every projection and MLP is quantized. The LM head stays float:
    OpenVINO 2026.4 compiles an INT8 LM head to logits of the wrong shape (see
    ptq.backends_breaking_contract), and PTQ keeps it float for the same reason. The vision
    part has no such arithmetic between hooked ops; both parts are checked for ONNX vs PyTorch
    parity after export, so a shifted quantizer cannot pass silently."""
    import nncf
    import torch
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    from edgevl.exporters.quantize.qdq import quiet

    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    n_layers = decoder.spec.n_layers
    vision_items = [torch.from_numpy(f["pixel_values"]) for f in feeds["vision"]]
    decoder_items = [decoder_args(f, n_layers) for f in feeds["decoder"]]
    with quiet():
        qvision = nncf.quantize(vision, nncf.Dataset(vision_items), model_type=nncf.ModelType.TRANSFORMER,
                                subset_size=len(vision_items), advanced_parameters=advanced)
        qdecoder = nncf.quantize(decoder, nncf.Dataset(decoder_items), model_type=nncf.ModelType.TRANSFORMER,
                                 subset_size=len(decoder_items), advanced_parameters=advanced,
                                 ignored_scope=nncf.IgnoredScope(types=["matmul"], patterns=[r".*lm_head.*"],
                                                                 validate=False))
    return qvision, qdecoder, vision_items[0], decoder_items[0]


def train_step_loss(qvision, qdecoder, pixels, batches, cfg):
    """Cross-entropy on answer tokens (edgevl.train's loss), through the decoder's cache path with
    an empty cache. ``batches``: edgevl.train.make_batch's (row image index, ids, targets) groups."""
    import torch
    import torch.nn.functional as F

    from edgevl.train import IGNORE

    image_tokens = qvision(pixels)                                         # (S, N, D)
    spec = qdecoder.spec
    loss_sum, n_targets = 0.0, 0
    for index, ids, tgt in batches:
        x = qdecoder.embed_tokens(ids)
        is_image = ids == cfg.image_token_id
        x = x.masked_scatter(is_image[..., None], image_tokens[index].reshape(-1, x.shape[-1]).to(x.dtype))
        b = ids.shape[0]
        empty = [torch.zeros(b, spec.n_kv_heads, 0, spec.head_dim) for _ in range(spec.n_layers)]
        logits, _, _ = qdecoder(x, empty, list(empty), torch.zeros(b, dtype=torch.int64), False)
        loss_sum = loss_sum + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                              ignore_index=IGNORE, reduction="sum")
        n_targets += int((tgt != IGNORE).sum())
    return loss_sum / max(1, n_targets)


def finetune(qvision, qdecoder, tokenizer, cfg, recipe: QATRecipe, log=print, progress: bool = True) -> list[dict]:
    import torch

    from edgevl.data.tasks import training_qas
    from edgevl.data.world import make_scene
    from edgevl.train import make_batch

    params = [p for m in (qvision, qdecoder) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    qvision.train()
    qdecoder.train()
    history = []
    bar = None
    if progress and recipe.steps:
        from tqdm import tqdm

        bar = tqdm(total=recipe.steps, desc="qat", unit="step")
    rng = np.random.default_rng(recipe.seed)
    try:
        for step in range(recipe.steps):
            # scenes the original training (seed 0) did not draw in this order: a fresh slice of the train split
            scenes = [make_scene("train", 10_000_000 + step * recipe.batch_scenes + j, recipe.seed)
                      for j in range(recipe.batch_scenes)]
            qas = [training_qas(s, variant_seed=int(rng.integers(1 << 30))) for s in scenes]
            pixels, batches = make_batch([s.image() for s in scenes], qas, tokenizer, cfg)
            loss = train_step_loss(qvision, qdecoder, pixels, batches, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step()
            history.append({"step": step + 1, "loss": round(loss.item(), 5)})
            if bar is not None:
                bar.set_postfix_str(f"loss {loss.item():.4f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    qvision.eval()
    qdecoder.eval()
    return history


def strip_native(qvision, qdecoder, vision_example, decoder_example):
    import nncf
    import torch

    with torch.no_grad():
        sv = nncf.strip(qvision, strip_format=nncf.StripFormat.NATIVE, example_input=vision_example)
        sd = nncf.strip(qdecoder, strip_format=nncf.StripFormat.NATIVE, example_input=decoder_example)
    return sv.eval(), sd.eval()


def qat_bundle(model: str = "edgevl-tiny", out=None, recipe: QATRecipe = QATRecipe(), force: bool = False,
               log=print, progress: bool = True) -> Bundle:
    """Fine-tune with fake quantization for ``recipe.steps`` steps and write a Q/DQ bundle at ``out``."""
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")   # nncf's JIT build passes 60 s on 2 loaded cores
    import torch

    from edgevl.exporters.export import export_model, load_exportable
    from edgevl.exporters.families.base import EmbedPart
    from edgevl.exporters.quantize.calibration import WorldSource
    from edgevl.exporters.quantize.decoder_feeds import part_feeds

    recipe.validate()
    if out is None:
        raise QuantizationError("qat needs an output bundle directory (--out)")
    out = Path(out)
    if out.exists() and not force:
        raise QuantizationError(f"{out} already exists; choose another --out or pass --force to replace it")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    vlm = load_exportable(model)
    if vlm.family != "edgevl-tiny":
        raise QuantizationError(f"qat fine-tunes on the model's own training data, which only edgevl-tiny has "
                                f"(got family {vlm.family!r}); use `edgevl quantize` (PTQ) for other models")
    tiny = vlm.reference.model
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.qat.", dir=out.parent))
    try:
        fp32 = export_model(model, stage / "fp32", log=lambda *a: None)
        feeds = part_feeds(fp32, WorldSource("train", recipe.seed + 1), ("vision", "decoder"), recipe.calib_samples,
                           recipe.decoder_prompts, 4, threads=recipe.threads)
        log(f"qat: {vlm.name}: NNCF fake quantization on {len(feeds['vision'])} images / "
            f"{len(feeds['decoder'])} decoder feeds")
        qvision, qdecoder, vex, dex = fake_quantize(vlm.vision, tiny.decoder, feeds, recipe)
        history = finetune(qvision, qdecoder, vlm.reference.tokenizer, tiny.cfg, recipe, log, progress)
        sv, sd = strip_native(qvision, qdecoder, vex, dex)
        vlm.vision, vlm.decoder, vlm.embed = sv, sd, EmbedPart(sd.embed_tokens)
        from edgevl.exporters.quantize.qat_export import write_qat_bundle

        bundle = write_qat_bundle(vlm, fp32, out, recipe, history, feeds, force, log)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log(f"qat: wrote {bundle.path} in {time.perf_counter() - t0:.1f} s")
    return bundle
