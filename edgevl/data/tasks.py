"""Questions and answers about a scene: count, colour, shape, position and caption.

Every scene has one question per task, chosen by the scene's own seed, so evaluation is
reproducible. Each task has a few phrasings; all are used in training, and evaluation draws
from the same phrasings (the test is about unseen layouts, not unseen grammar).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevl.data.world import COLORS, POSITIONS, SHAPES, Scene

TASKS = ("count", "color", "shape", "position", "caption")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")

TEMPLATES = {
    "count": ("how many shapes are there?", "how many objects are in the image?", "count the shapes."),
    "color": ("what color is the {shape}?", "which color does the {shape} have?"),
    "shape": ("what shape is the {color} object?", "which shape is {color}?"),
    "position": ("where is the {color} {shape}?", "in which part of the image is the {color} {shape}?",
                 "where is the {shape}?"),
    "caption": ("describe the image.", "what is in the picture?", "caption this image."),
}


@dataclass(frozen=True)
class QA:
    task: str
    question: str
    answer: str


def caption(scene: Scene) -> str:
    parts = [f"a {o.color} {o.shape} at {o.position}" for o in scene.ordered_objects()]
    return " and ".join(parts)


def scene_qas(scene: Scene, variant_seed: int = 0) -> list[QA]:
    """One question per task for this scene, deterministic in (scene, variant_seed)."""
    rng = np.random.default_rng([scene.texture_seed, variant_seed])
    target = scene.objects[int(rng.integers(len(scene.objects)))]

    def pick(task: str) -> str:
        options = TEMPLATES[task]
        return options[int(rng.integers(len(options)))]

    return [
        QA("count", pick("count"), NUMBER_WORDS[len(scene.objects)]),
        QA("color", pick("color").format(shape=target.shape), target.color),
        QA("shape", pick("shape").format(color=target.color), target.shape),
        QA("position", pick("position").format(color=target.color, shape=target.shape), target.position),
        QA("caption", pick("caption"), caption(scene)),
    ]


def training_qas(scene: Scene, variant_seed: int = 0) -> list[QA]:
    """Training asks about every object, not one: colour, shape and position questions are
    one- or two-token answers that need a lookup in the image, so they get one example per
    object (about 2.5x more than evaluation's one per task) while a caption stays one."""
    rng = np.random.default_rng([scene.texture_seed, variant_seed, 1])

    def pick(task: str) -> str:
        options = TEMPLATES[task]
        return options[int(rng.integers(len(options)))]

    qas = [QA("count", pick("count"), NUMBER_WORDS[len(scene.objects)]), QA("caption", pick("caption"), caption(scene))]
    for o in scene.objects:
        qas += [QA("color", pick("color").format(shape=o.shape), o.color),
                QA("shape", pick("shape").format(color=o.color), o.shape),
                QA("position", pick("position").format(color=o.color, shape=o.shape), o.position)]
    return qas


def vocabulary() -> list[str]:
    """Every word the world can ask or answer, in a stable order (the tokenizer's vocabulary)."""
    words: list[str] = []
    texts = [t for options in TEMPLATES.values() for t in options]
    texts += list(COLORS) + list(SHAPES) + list(POSITIONS.values()) + list(NUMBER_WORDS)
    texts += ["a at and", "question: answer:"]
    import re

    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]", text.replace("{shape}", "").replace("{color}", "")):
            if word not in words:
                words.append(word)
    return words
