"""Exact-match evaluation on held-out scenes, for any answerer (PyTorch or a bundle runtime).

An answerer is a callable ``(images, questions) -> answers``; batches are formed here so a
backend that batches well can, and one that does not simply loops.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import numpy as np

from edgevl.data.tasks import TASKS, scene_qas
from edgevl.data.world import SceneSet

Answerer = Callable[[Sequence[np.ndarray], Sequence[str]], Sequence[str]]


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def evaluate(answerer: Answerer, n: int = 200, split: str = "test", seed: int = 0,
             batch_scenes: int = 16, progress: bool = False, keep_answers: bool = False) -> dict:
    """Ask every task about ``n`` scenes of ``split``; return overall and per-task accuracy."""
    scenes = SceneSet(split, n, seed)
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    answers = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"eval {split}", unit="scene")
    for start in range(0, n, batch_scenes):
        batch = [scenes[i] for i in range(start, min(n, start + batch_scenes))]
        images, questions, refs = [], [], []
        for scene in batch:
            image = scene.image()
            for qa in scene_qas(scene):
                images.append(image)
                questions.append(qa.question)
                refs.append(qa)
        predicted = answerer(images, questions)
        for qa, pred, q_index in zip(refs, predicted, range(len(refs))):
            ok = normalise(pred) == normalise(qa.answer)
            correct[qa.task] += ok
            total[qa.task] += 1
            if keep_answers:
                answers.append({"scene": batch[q_index // len(TASKS)].index, "task": qa.task,
                                "question": qa.question, "expected": qa.answer, "answer": pred})
        if bar:
            bar.update(len(batch))
    if bar:
        bar.close()
    by_task = {t: correct[t] / total[t] for t in TASKS if total[t]}
    result = {"n": n, "split": split, "accuracy": sum(correct.values()) / max(1, sum(total.values())),
              "by_task": by_task}
    if keep_answers:
        result["answers"] = answers
    return result
