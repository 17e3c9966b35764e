"""Train edgevl-tiny on the synthetic world, on the CPU, within a wall-clock budget.

Two phases, like real VLMs (whose vision encoders are pretrained before the VLM is):

1. **Vision pretraining** (a few minutes): the encoder and projector learn a dense objective,
   which colour and which shape has its centre in each image token's region (``AuxHead``).
   A vision-only step is ~5x cheaper per image than a VLM step, so the encoder sees many
   more scenes early; a from-scratch ViT trained only through the language loss stalls for
   a long time on a CPU budget.
2. **VLM training**: every step draws fresh scenes (the world is infinite), asks all five
   tasks about each, encodes each image once and shares it across its questions; loss on the
   answer tokens only, plus the auxiliary loss at a lower weight.

A background process renders scenes while the model trains. The auxiliary head is not part
of the model and is not saved.
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

from edgevl.data.tasks import training_qas, vocabulary
from edgevl.data.world import COLORS, SHAPES, make_scene
from edgevl.evaluate import evaluate
from edgevl.models.checkpoint import save_checkpoint
from edgevl.models.config import TinyVLMConfig
from edgevl.models.reference import TorchAnswerer, encode_prompt, pad_right, preprocess
from edgevl.models.tokenizer import build_tokenizer
from edgevl.models.vlm import TinyVLM

IGNORE = -100


@dataclass
class TrainRecipe:
    minutes: float = 28.0          # wall-clock budget for both phases
    vision_minutes: float = 5.0    # phase 1 share of the budget
    vision_batch: int = 64
    vision_lr: float = 2e-3
    batch_scenes: int = 16         # phase 2: images per step; each carries all five questions
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    aux_weight: float = 0.5        # phase 2 weight of the auxiliary per-token object loss
    eval_every_s: float = 240.0
    eval_scenes: int = 40
    seed: int = 0
    threads: int = 2


# -- data ---------------------------------------------------------------------------------------
def object_targets(scene, grid: int) -> np.ndarray:
    """(grid*grid, 2) int64: per image-token region, the colour and shape of the object whose
    centre lies in it (0 = none)."""
    out = np.zeros((grid * grid, 2), dtype=np.int64)
    colors, shapes = list(COLORS), list(SHAPES)
    for o in scene.objects:
        r, c = min(grid - 1, int(o.cy * grid)), min(grid - 1, int(o.cx * grid))
        out[r * grid + c] = (colors.index(o.color) + 1, shapes.index(o.shape) + 1)
    return out


def _render_worker(batch: int, seed: int, grid: int, with_qas: bool, queue: "mp.Queue") -> None:
    torch.set_num_threads(1)
    step = 0
    while True:
        scenes = [make_scene("train", step * batch + j, seed) for j in range(batch)]
        rng = np.random.default_rng([seed, step])
        images = [s.image() for s in scenes]
        qas = [training_qas(s, variant_seed=int(rng.integers(1 << 30))) for s in scenes] if with_qas else None
        queue.put((images, qas, np.stack([object_targets(s, grid) for s in scenes])))
        step += 1


class SceneStream:
    """Batches of rendered training scenes from a background process."""

    def __init__(self, batch: int, seed: int, grid: int, with_qas: bool):
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue(maxsize=8)
        self.worker = ctx.Process(target=_render_worker, args=(batch, seed, grid, with_qas, self.queue), daemon=True)
        self.worker.start()

    def next(self):
        return self.queue.get()

    def close(self) -> None:
        self.worker.terminate()
        self.worker.join(timeout=5)


class AuxHead(torch.nn.Module):
    """Training-only head on the projector's image tokens: colour and shape whose centre lies
    in each token's region. Dense supervision tells the from-scratch encoder where objects are."""

    def __init__(self, dim: int):
        super().__init__()
        self.color = torch.nn.Linear(dim, len(COLORS) + 1)
        self.shape = torch.nn.Linear(dim, len(SHAPES) + 1)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # shape is the harder half (colour is nearly linear in the pixels): weight it double
        return (F.cross_entropy(self.color(tokens).flatten(0, 1), targets[..., 0].flatten())
                + 2.0 * F.cross_entropy(self.shape(tokens).flatten(0, 1), targets[..., 1].flatten()))

    @torch.no_grad()
    def accuracy(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        """Colour and shape accuracy on the tokens that hold an object centre."""
        has = targets[..., 0] > 0
        color = (self.color(tokens).argmax(-1) == targets[..., 0])[has].float().mean().item()
        shape = (self.shape(tokens).argmax(-1) == targets[..., 1])[has].float().mean().item()
        return color, shape


def make_batch(images, qas, tokenizer, cfg: TinyVLMConfig):
    """-> pixels (B,3,S,S) and two groups of (row image index, input ids, targets): the short
    questions and the long captions, padded separately (one padded batch would waste much of
    the compute on padding)."""
    groups: dict[bool, tuple[list, list, list]] = {False: ([], [], []), True: ([], [], [])}
    for image_index, scene_qas_ in enumerate(qas):
        for qa in scene_qas_:
            prompt = encode_prompt(tokenizer, cfg, qa.question)
            answer = tokenizer.encode(qa.answer, add_special_tokens=False).ids + [cfg.eos_token_id]
            seq = prompt + answer
            index, rows, targets = groups[qa.task == "caption"]
            index.append(image_index)
            rows.append(seq[:-1])
            targets.append([IGNORE] * (len(prompt) - 1) + answer)
    batches = [(torch.tensor(index), pad_right(rows, cfg.pad_token_id), pad_right(targets, IGNORE))
               for index, rows, targets in groups.values() if rows]
    return preprocess(images, cfg), batches


# -- optimisation ---------------------------------------------------------------------------------
def make_optimizer(named_params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for n, p in named_params if p.ndim >= 2 and "position" not in n]
    no_decay = [p for n, p in named_params if p.ndim < 2 or "position" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def cosine_lr(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Phase:
    """A timed optimisation loop: re-estimates how many steps fit in its budget for the LR
    schedule, logs losses and drives the progress bar."""

    def __init__(self, name: str, seconds: float, clock_start: float, log: dict, bar):
        self.name, self.seconds, self.clock_start, self.log, self.bar = name, seconds, clock_start, log, bar
        self.start = time.perf_counter()
        self.step, self.est_total, self.ema = 0, 10_000, None

    def running(self) -> bool:
        return time.perf_counter() - self.start < self.seconds

    def record(self, loss: float) -> None:
        self.step += 1
        self.ema = loss if self.ema is None else 0.98 * self.ema + 0.02 * loss
        now = time.perf_counter()
        self.log["steps"].append({"phase": self.name, "step": self.step, "t": round(now - self.clock_start, 2),
                                  "loss": round(loss, 5)})
        if self.step >= 20:
            self.est_total = max(self.step + 1, int(self.seconds / ((now - self.start) / self.step)))
        if self.bar:
            self.bar.n = int(now - self.clock_start)
            self.bar.set_postfix_str(f"{self.name} step {self.step} loss {self.ema:.4f}")
            self.bar.refresh()


def pretrain_vision(model: TinyVLM, aux: AuxHead, recipe: TrainRecipe, phase: Phase) -> None:
    grid = int(model.cfg.image_seq_len ** 0.5)
    named = ([("vision." + n, p) for n, p in model.vision.named_parameters()]
             + [("projector." + n, p) for n, p in model.projector.named_parameters()]
             + [("aux." + n, p) for n, p in aux.named_parameters()])
    opt = make_optimizer(named, recipe.vision_lr, recipe.weight_decay)
    stream = SceneStream(recipe.vision_batch, recipe.seed + 1000, grid, with_qas=False)
    try:
        while phase.running():
            images, _, targets = stream.next()
            for group in opt.param_groups:
                group["lr"] = cosine_lr(phase.step, phase.est_total, recipe.vision_lr, 50, 0.1)
            tokens = model.encode_images(preprocess(images, model.cfg))
            loss = aux.loss(tokens, torch.from_numpy(targets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], recipe.grad_clip)
            opt.step()
            phase.record(loss.item())
            if phase.step % 200 == 0 and phase.bar:
                color, shape = aux.accuracy(tokens, torch.from_numpy(targets))
                phase.bar.write(f"vision step {phase.step}: token colour accuracy {color:.3f}, shape {shape:.3f}")
    finally:
        stream.close()


def train_vlm(model: TinyVLM, aux: AuxHead, tokenizer, recipe: TrainRecipe, phase: Phase) -> None:
    cfg = model.cfg
    named = list(model.named_parameters()) + [("aux." + n, p) for n, p in aux.named_parameters()]
    opt = make_optimizer(named, recipe.lr, recipe.weight_decay)
    stream = SceneStream(recipe.batch_scenes, recipe.seed, int(cfg.image_seq_len ** 0.5), with_qas=True)
    last_eval = time.perf_counter()
    try:
        while phase.running():
            images, qas, aux_targets = stream.next()
            pixels, batches = make_batch(images, qas, tokenizer, cfg)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(phase.step, phase.est_total, recipe.lr, recipe.warmup_steps, recipe.min_lr_ratio)
            model.train()
            image_tokens = model.encode_images(pixels)
            loss_sum, n_targets = 0.0, 0
            for index, ids, tgt in batches:
                logits, _, _ = model.decoder(model.embed(ids, image_tokens[index]))
                loss_sum = loss_sum + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                      ignore_index=IGNORE, reduction="sum")
                n_targets += int((tgt != IGNORE).sum())
            loss = loss_sum / n_targets
            if recipe.aux_weight:
                loss = loss + recipe.aux_weight * aux.loss(image_tokens, torch.from_numpy(aux_targets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], recipe.grad_clip)
            opt.step()
            phase.record(loss.item())
            if time.perf_counter() - last_eval > recipe.eval_every_s:
                model.eval()
                res = evaluate(TorchAnswerer(model, tokenizer), n=recipe.eval_scenes, split="val")
                phase.log["evals"].append({"step": phase.step, "t": round(time.perf_counter() - phase.clock_start, 1),
                                           **res})
                if phase.bar:
                    phase.bar.write(f"step {phase.step}: val accuracy {res['accuracy']:.3f} "
                                    + " ".join(f"{k}={v:.2f}" for k, v in res["by_task"].items()))
                last_eval = time.perf_counter()
    finally:
        stream.close()


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
    aux = AuxHead(cfg.lm_hidden_dim)
    budget = recipe.minutes * 60
    log = {"recipe": asdict(recipe), "steps": [], "evals": []}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(budget), desc="train edgevl-tiny", unit="s",
                   bar_format="{l_bar}{bar}| {n:.0f}/{total}s {postfix}")
    start = time.perf_counter()
    try:
        vision_seconds = min(recipe.vision_minutes * 60, budget)
        if vision_seconds > 0:
            pretrain_vision(model, aux, recipe, Phase("vision", vision_seconds, start, log, bar))
        train_vlm(model, aux, tokenizer, recipe, Phase("vlm", budget - (time.perf_counter() - start), start, log, bar))
    finally:
        if bar:
            bar.close()
    log["train_seconds"] = round(time.perf_counter() - start, 1)
    log["total_steps"] = {p: sum(1 for s in log["steps"] if s["phase"] == p) for p in ("vision", "vlm")}
    model.eval()
    out = save_checkpoint(model, tokenizer, out_dir, extra_files={"training_log.json": json.dumps(log)})
    plot_loss(log, out / "loss.png")
    return log


def plot_loss(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    window = 25
    for ax, phase, title in ((axes[0], "vision", "phase 1: vision pretraining (aux loss)"),
                             (axes[1], "vlm", "phase 2: VLM (answer tokens + aux)")):
        steps = [s["step"] for s in log["steps"] if s["phase"] == phase]
        losses = np.array([s["loss"] for s in log["steps"] if s["phase"] == phase])
        if not len(losses):
            continue
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid") if len(losses) > window else losses
        ax.plot(steps, losses, alpha=0.25, label="loss")
        ax.plot(steps[len(steps) - len(smooth):], smooth, label=f"mean of {window}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    for e in log["evals"]:
        axes[1].annotate(f"{e['accuracy']:.2f}", (e["step"], 0), xycoords=("data", "axes fraction"), fontsize=7)
    fig.suptitle(f"edgevl-tiny: {log['total_steps']} steps in {log['train_seconds'] / 60:.1f} min "
                 "(numbers at the bottom: validation accuracy)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
