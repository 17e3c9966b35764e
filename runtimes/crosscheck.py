"""Cross-backend checks of a bundle (no torch): the same realistic feeds through every backend.

Feeds: held-out scenes of the synthetic world through the bundle's preprocessing (vision), a
real prompt (embed), and the decoder on that prompt's prefill plus one decode step on the
resulting cache, both built with the first backend.
"""

from __future__ import annotations

import numpy as np

from edgevl.bundle import Bundle
from edgevl.preprocess import preprocess
from edgevl.runtimes.compare import Comparator, PartReport
from edgevl.runtimes.engine import Engine


def part_feeds(engine: Engine, prompt: str = "describe the image.", n_images: int = 2) -> dict[str, list[dict]]:
    from edgevl.data.world import make_scene

    images = [make_scene("test", i, seed=777).image() for i in range(n_images)]
    pixels = preprocess(images, engine.preprocess_spec, channels="rgb")
    ids = engine.encode_prompt(prompt)
    image_embeds = engine.encode_images(pixels[:1])
    embeds = engine.merge(ids, image_embeds)
    cache = engine.new_cache(slots=1, capacity=len(ids) + 8)
    prefill = {"inputs_embeds": embeds, **{k: v.copy() for k, v in cache.feeds(slice(0, 1)).items()},
               **engine.decoder_extras(cache, slice(0, 1), ids[None, :])}
    logits = engine.prefill(cache, 0, embeds, ids)
    token = np.asarray([[int(np.argmax(logits))]], np.int64)
    decode = {"inputs_embeds": engine.embed_tokens(token), **{k: v.copy() for k, v in cache.feeds(slice(0, 1)).items()},
              **engine.decoder_extras(cache, slice(0, 1), None)}
    return {"vision": [{"pixel_values": pixels[:1]}, {"pixel_values": pixels}],
            "embed": [{"input_ids": ids[None, :]}],
            "decoder": [prefill, decode]}


def compare_backends(bundle: Bundle, backends: list[str], atol: float = 1e-4,
                     threads: int | None = None) -> list[PartReport]:
    """Every part on every backend against the first backend."""
    if len(backends) < 2:
        from edgevl.errors import ConfigError

        raise ConfigError(f"compare needs at least two backends, got {backends}; install openvino "
                          "(`pip install edgevl[openvino]`) or name them with --backends")
    engines = [Engine(bundle, b, threads=threads).activate() for b in backends]
    try:
        feeds = part_feeds(engines[0])
        comparator = Comparator(atol=atol)
        reports = []
        for other in engines[1:]:
            for part, part_feed_list in feeds.items():
                reports.append(comparator.compare(part, engines[0].runners[part], other.runners[part],
                                                  part_feed_list, ref_name=engines[0].backend,
                                                  cand_name=other.backend))
        return reports
    finally:
        for e in engines:
            e.close()
