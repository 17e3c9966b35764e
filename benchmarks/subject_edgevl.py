"""A bundle on one backend, driven through edgevl's runtime (edgevl.load, Engine, KVCache).

The generation loop is the runtime's own steps (``Engine.merge``, ``Engine.prefill_rows`` into the
preallocated cache, ``Engine.decode``) with argmax in place of the sampler and no stop token,
so every subject decodes exactly the same number of tokens.
"""

from __future__ import annotations

import time

import numpy as np

from edgevl.benchmarks.subject import GenerationTiming, Subject


class EdgeVLSubject(Subject):
    tool = "edgevl"

    def __init__(self, bundle_path, backend: str, precision: str, threads: int | None, options: dict | None = None):
        super().__init__(bundle_path, precision, threads)
        self.backend = backend
        self.options = options or {}

    def _load(self) -> None:
        import edgevl

        self.vlm = edgevl.load(self.model, backend=self.backend, threads=self.threads, options=self.options,
                               verbose=False)
        self.engine = self.vlm.engine
        self.spec = self.vlm.preprocess_spec

    # -- measured calls ------------------------------------------------------------------------
    def pixels(self, images):
        return self.vlm.pixels(images, channels="rgb")

    def encode(self, pixels):
        return self.engine.encode_images(pixels)

    def generate(self, images, prompt, new_tokens):
        engine, batch = self.engine, len(images)
        t0 = time.perf_counter()
        pixels = self.vlm.pixels(images, channels="rgb")
        ids = engine.encode_prompt(prompt, n_images=1)
        engine.check_context(len(ids), new_tokens)
        image_embeds = engine.encode_images(pixels)
        embeds = np.concatenate([engine.merge(ids, image_embeds[b:b + 1]) for b in range(batch)])
        cache = engine.new_cache(slots=batch, capacity=len(ids) + new_tokens)
        tokens = engine.prefill_rows(cache, 0, embeds, np.stack([ids] * batch)).argmax(-1)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            tokens = engine.decode(cache, batch, tokens).argmax(-1)
        t2 = time.perf_counter()
        return GenerationTiming((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3, new_tokens, batch, len(ids))

    def decode_at(self, position, steps, batch=1):
        engine = self.engine
        cache = engine.new_cache(slots=batch, capacity=position + steps)
        cache.ensure(position + steps)
        cache.length[:batch] = position
        tokens = np.zeros(batch, dtype=np.int64)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            engine.decode(cache, batch, tokens)
            times.append((time.perf_counter() - t) * 1e3)
        return times

    def max_position(self) -> int:
        return int(self.engine.dec["max_position"])

    # -- facts, accuracy, overhead -------------------------------------------------------------
    def describe(self) -> dict:
        bundle = self.vlm.bundle
        files = bundle.manifest["files"]
        loaded = {part: _loaded_files(bundle, part, self.backend) for part in bundle.parts}
        return {
            # what this backend loads (an OpenVINO bundle also carries the ONNX it came from)
            "size_bytes": sum(files[r]["bytes"] for rels in loaded.values() for r in rels),
            # one decode step reads every decoder weight (the embedding part reads one row)
            "decoder_weight_bytes": sum(files[r]["bytes"] for r in loaded["decoder"] if not r.endswith(".xml")),
            "image_tokens": int(bundle.manifest["prompt"]["image_seq_len"]),
            "bundle": str(bundle.path),
            "loaded_files": sorted(r for rels in loaded.values() for r in rels),
            "execution_precision": self._execution_precision(),
        }

    def _execution_precision(self) -> str | None:
        runner = self.engine.runners["vision"]
        return getattr(runner, "execution_precision", None) if self.backend == "openvino" else None

    def answerer(self):
        return lambda images, questions: self.vlm.answer(images, questions, channels="rgb")

    def vision_overhead(self, pixels, pairs):
        """Alternate edgevl's ``Engine.encode_images`` with the bare backend call on the same
        compiled graph and the same input (so drift hits both alike)."""
        bare = _bare_vision_call(self.engine.runners["vision"], pixels)
        if bare is None:
            return None
        ours = lambda: self.engine.encode_images(pixels)  # noqa: E731
        for _ in range(3):
            ours(), bare()
        edgevl_ms, bare_ms = [], []
        for i in range(pairs):
            order = (ours, bare) if i % 2 == 0 else (bare, ours)
            for fn in order:
                t = time.perf_counter()
                fn()
                (edgevl_ms if fn is ours else bare_ms).append((time.perf_counter() - t) * 1e3)
        return {"edgevl_ms": edgevl_ms, "bare_ms": bare_ms, "batch": int(pixels.shape[0])}

    def close(self) -> None:
        self.vlm.close()


def _loaded_files(bundle, part: str, backend: str) -> list[str]:
    """Manifest paths of the graph a backend loads for ``part`` and its weight files
    (``x.xml`` + ``x.bin``; ``x.onnx`` + external data named after it)."""
    main = bundle.part_file(part, backend).relative_to(bundle.path).as_posix()
    stem = main.rsplit(".", 1)[0]
    return [rel for rel in bundle.manifest["files"]
            if rel == main or rel.startswith(main + ".") or rel in (stem + ".bin", stem + ".data")]


def _bare_vision_call(runner, pixels):
    """The backend's own call on the runner's compiled model: what a user writing plain ONNX
    Runtime / OpenVINO code gets, with the output fetched as a numpy array like ours."""
    feeds = {"pixel_values": pixels}
    if runner.backend == "onnxruntime":
        session = runner.session
        return lambda: session.run(None, feeds)[0]
    if runner.backend == "openvino":
        request = runner.compiled.create_infer_request()
        port = runner.compiled.outputs[0]
        return lambda: request.infer(feeds, share_inputs=True)[port]
    return None
