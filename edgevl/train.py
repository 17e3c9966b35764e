"""Train edgevl-tiny on the synthetic world, on the CPU, within a time budget.

Every step draws fresh training scenes (the world is infinite), asks all five tasks about
each, encodes each image once and shares it across its five questions. Loss is on the answer
tokens only. A background process renders scenes while the model trains.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgevl.data.tasks import TASKS, scene_qas, vocabulary
from edgevl.data.world import make_scene
from edgevl.evaluate import evaluate
from edgevl.models.checkpoint import save_checkpoint
from edgevl.models.config import TinyVLMConfig
from edgevl.models.reference import TorchAnswerer, encode_prompt, pad_right, preprocess
from edgevl.models.tokenizer import build_tokenizer
from edgevl.models.vlm import TinyVLM

IGNORE = -100


@dataclass
class TrainRecipe:
    minutes: float = 28.0          # wall-clock budget for the optimisation loop
    batch_scenes: int = 16         # images per step; each carries all five questions
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 150
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    eval_every_s: float = 240.0
    eval_scenes: int = 40
    seed: int = 0
    threads: int = 2


def _render_worker(batch_scenes: int, seed: int, queue: "mp.Queue") -> None:
    torch.set_num_threads(1)
    step = 0
    while True:
        scenes = [make_scene("train", step * batch_scenes + j, seed) for j in range(batch_scenes)]
        rng = np.random.default_rng([seed, step])
        images = [s.image() for s in scenes]
        qas = [scene_qas(s, variant_seed=int(rng.integers(1 << 30))) for s in scenes]
        queue.put((images, qas))
        step += 1


def make_batch(images, qas, tokenizer, cfg: TinyVLMConfig):
    """-> pixels (B,3,S,S), input ids (B*5, T), targets (B*5, T) with the prompt ignored."""
    rows, targets = [], []
    for scene_qas_ in qas:
        for qa in scene_qas_:
            prompt = encode_prompt(tokenizer, cfg, qa.question)
            answer = tokenizer.encode(qa.answer, add_special_tokens=False).ids + [cfg.eos_token_id]
            seq = prompt + answer
            rows.append(seq[:-1])
            targets.append([IGNORE] * (len(prompt) - 1) + answer)
    ids = pad_right(rows, cfg.pad_token_id)
    tgt = pad_right(targets, IGNORE)
    return preprocess(images, cfg), ids, tgt


def lr_at(step: int, total: int, recipe: TrainRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = min(1.0, (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine)


def train(out_dir: str | Path, recipe: TrainRecipe = TrainRecipe(), cfg: TinyVLMConfig | None = None,
          progress: bool = True) -> dict:
    torch.set_num_threads(recipe.threads)
    torch.set_flush_denormal(True)   # without it, backward slows ~10x on denormal gradients
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer(vocabulary())
    cfg = cfg or TinyVLMConfig()
    cfg.lm_vocab_size = tokenizer.get_vocab_size()
    cfg.image_token_id = tokenizer.token_to_id("<image>")
    cfg.bos_token_id = tokenizer.token_to_id("<bos>")
    cfg.eos_token_id = tokenizer.token_to_id("<eos>")
    cfg.pad_token_id = tokenizer.token_to_id("<pad>")
    model = TinyVLM(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "position" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "position" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))

    queue: mp.Queue = mp.get_context("spawn").Queue(maxsize=8)
    worker = mp.get_context("spawn").Process(target=_render_worker, args=(recipe.batch_scenes, recipe.seed, queue),
                                             daemon=True)
    worker.start()
    budget = recipe.minutes * 60
    log = {"recipe": asdict(recipe), "steps": [], "evals": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(budget), desc="train edgevl-tiny", unit="s", bar_format="{l_bar}{bar}| {n:.0f}/{total}s {postfix}")
    start = time.perf_counter()
    last_eval = start
    step, est_total = 0, 10_000
    ema = None
    try:
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                break
            images, qas = queue.get()
            pixels, ids, tgt = make_batch(images, qas, tokenizer, cfg)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, est_total, recipe)
            model.train()
            embeds = model.encode_images(pixels).repeat_interleave(len(TASKS), 0)
            logits, _, _ = model.decoder(model.embed(ids, embeds))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            step += 1
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            log["steps"].append({"step": step, "t": round(elapsed, 2), "loss": round(loss.item(), 5)})
            # re-estimate the total number of steps that fit in the budget, for the schedule
            if step >= 20:
                per_step = (time.perf_counter() - start) / step
                est_total = max(step + 1, int(budget / per_step))
            if bar:
                bar.n = min(int(time.perf_counter() - start), int(budget))
                bar.set_postfix_str(f"step {step} loss {ema:.4f}")
            if time.perf_counter() - last_eval > recipe.eval_every_s:
                model.eval()
                res = evaluate(TorchAnswerer(model, tokenizer), n=recipe.eval_scenes, split="val")
                log["evals"].append({"step": step, "t": round(time.perf_counter() - start, 1), **res})
                if bar:
                    bar.write(f"step {step}: val accuracy {res['accuracy']:.3f} "
                              + " ".join(f"{k}={v:.2f}" for k, v in res["by_task"].items()))
                last_eval = time.perf_counter()
    finally:
        worker.terminate()
        if bar:
            bar.close()
    log["train_seconds"] = round(time.perf_counter() - start, 1)
    log["total_steps"] = step
    model.eval()
    out = save_checkpoint(model, tokenizer, out_dir, extra_files={"training_log.json": json.dumps(log)})
    plot_loss(log, out / "loss.png")
    return log


def plot_loss(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s["step"] for s in log["steps"]]
    losses = np.array([s["loss"] for s in log["steps"]])
    window = 25
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid") if len(losses) > window else losses
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.25, label="loss")
    ax.plot(steps[len(steps) - len(smooth):], smooth, label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.set_title(f"edgevl-tiny training: {log['total_steps']} steps in {log['train_seconds'] / 60:.1f} min")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
