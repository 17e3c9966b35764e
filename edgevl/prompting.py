"""Prompt templates: where the image tokens go and how the question is framed.

Shared by training, the exporters and the runtime (no torch here), so the token ids the
runtime builds are exactly the ones the model was trained or checked with.
"""

from __future__ import annotations


def render_prompt(template: str, prompt: str, image_block: str, n_images: int = 1) -> str:
    """Fill ``{image}`` with one image block per image and ``{prompt}`` with the user's text.

    ``image_block`` is the text that stands for one image, e.g. ``"<image>" * 16`` (the
    processor of the model family decides it; the bundle's manifest stores it).
    """
    if "{prompt}" not in template:
        raise ValueError(f"prompt template {template!r} has no {{prompt}} slot")
    images = image_block * n_images
    return template.replace("{image}", images).replace("{prompt}", prompt)
