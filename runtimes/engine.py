"""The inference engine: a bundle's three parts on one backend, plus tokens and the KV cache.

It knows the part contract (see edgevl.models.decoder for the cache semantics):

- vision:  pixel_values (B, 3, H, W) float32 -> image_embeds (B, N, D)
- embed:   input_ids (B, T) int64 -> inputs_embeds (B, T, D)
- decoder: inputs_embeds (B, T, D), past_len (B,), past_key.i / past_value.i (B, KV, C, Dh)
           -> logits (B, V) for the last of the T positions, present_key.i / present_value.i
           (B, KV, T, Dh) for the T new positions only.

Single-request generation and the in-flight scheduler are both written on top of the two
steps here: ``prefill`` (one slot, a whole prompt) and ``decode`` (a packed range of slots,
one token each).
"""

from __future__ import annotations

import numpy as np

from edgevl.bundle import Bundle
from edgevl.errors import BackendError, BundleError, InputError
from edgevl.prompting import render_prompt
from edgevl.runtimes.kv_cache import KVCache
from edgevl.runtimes.mrope import MRoPEPositions
from edgevl.runtimes.registry import get_runner_class


MAX_TOKENIZER_BYTES = 256 << 20       # the biggest real tokenizer.json files are tens of MB


def load_tokenizer(bundle: Bundle):
    """The bundle's tokenizer, from the path the containment resolver checked; a file that is
    not a tokenizer is a BundleError naming it (not a bare JSON error from the library)."""
    from tokenizers import Tokenizer

    path = bundle.file(bundle.manifest["tokenizer"]["file"], "tokenizer.file")
    if not path.is_file() or path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise BundleError(f"{bundle.path}: tokenizer file {path.name} is missing or larger than "
                          f"{MAX_TOKENIZER_BYTES >> 20} MiB; rebuild the bundle")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:   # tokenizers raises its own Exception type for any parse error
        raise BundleError(f"{bundle.path}: tokenizer file {path.name} (manifest field tokenizer.file) cannot be "
                          f"read as a tokenizer ({e}); rebuild the bundle") from e
    vocab = int(bundle.manifest["decoder"]["vocab_size"])
    if tokenizer.get_vocab_size() > vocab:
        raise BundleError(f"{bundle.path}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the decoder's "
                          f"vocabulary is {vocab}; the tokenizer does not belong to this model, rebuild the bundle")
    return tokenizer


def _part_options(backend: str, part: str, options: dict | None) -> dict | None:
    """Per-part ONNX Runtime settings; the caller's own ``options`` always win.

    - ``spinning`` off except for the decoder. ORT's worker threads spin after a call so that
      the next one starts at once: right for the decoder, called back to back, but a part called
      once per request (vision, the prefill graph) or between decoder calls (embed) leaves its
      threads spinning on the cores the decoder needs next. Measured on a 2-core AVX2 EPYC: the
      first decode steps after a spinning prefill graph 9.3 vs 6.9 ms, a prefill after a
      spinning vision part 282 vs 252 ms; the parts themselves were no slower without it.
    - ``memory_pattern`` off and ``release_memory`` on for vision and the prefill graph. With
      the pattern, ORT plans each run's activations as one buffer per input shape, which its
      arena keeps beside the blocks it already holds; and whatever the arena holds after a
      vision run stays resident while the decoder runs. Measured on the SmolVLM-shaped vision
      part (static INT8, 2-core AMD EPYC): resident after six runs 325 MB with the pattern,
      246 MB without, 177-201 MB when the arena also gives its memory back after each run, no
      slower within that run's noise (839-885 ms a run across the three settings). With the heap
      trim after loading (runtimes/onnxruntime.release_freed_heap), the SmolVLM-shaped int4
      bundle's process peaked at 574 MB over seven answers instead of 724, the int8 one at 478
      instead of 629."""
    if backend != "onnxruntime":
        return options
    tuned = {} if part == "decoder" else {"spinning": False}
    if part in ("vision", "prefill"):
        tuned.update(memory_pattern=False, release_memory=True)
    return {**tuned, **(options or {})}


class PromptCodec:
    """The text side of a bundle: prompt -> token ids (image blocks included), ids -> text, and the
    checks a request must pass before it is queued. Numpy and the tokenizer only, no model part:
    ``edgevl serve`` uses it in the server process while the engine runs in its own
    (edgevl/serving/engine_process.py)."""

    def __init__(self, bundle: Bundle):
        m = bundle.manifest
        self.dec = m["decoder"]
        self.prompt_spec = m["prompt"]
        self.tok_spec = m["tokenizer"]
        self.preprocess_spec = m["preprocess"]
        self.tokenizer = load_tokenizer(bundle)
        self.image_token_id = int(self.prompt_spec["image_token_id"])
        self.image_seq_len = int(self.prompt_spec["image_seq_len"])
        self.eos_ids = tuple(int(i) for i in self.tok_spec.get("eos_token_ids", []))
        limit = self.prompt_spec.get("max_images")        # e.g. BLIP-2, Gemma 3: one image per prompt
        self.max_images = None if limit is None else int(limit)

    def _check_image_count(self, n_images: int, who: str) -> None:
        if self.max_images is not None and n_images > self.max_images:
            raise InputError(f"{who}: {n_images} images, but this model takes at most {self.max_images} per prompt "
                             "(manifest prompt.max_images); ask about each image in a request of its own")

    def encode_prompt(self, prompt: str, n_images: int = 1) -> np.ndarray:
        self._check_image_count(n_images, "prompt")
        text = render_prompt(self.prompt_spec["template"], prompt, self.prompt_spec["image_block"], n_images)
        ids = self.tokenizer.encode(text, add_special_tokens=bool(self.tok_spec.get("add_special_tokens", False))).ids
        return np.asarray(ids, dtype=np.int64)

    def decode_tokens(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def check_context(self, n_prompt: int, max_new_tokens: int) -> None:
        limit = int(self.dec["max_position"])
        if n_prompt + max_new_tokens > limit:
            raise InputError(f"prompt is {n_prompt} tokens and {max_new_tokens} new tokens were asked for, "
                             f"but the model's context is {limit} tokens; shorten the prompt or lower max_new_tokens "
                             f"(at most {max(0, limit - n_prompt)} new tokens fit)")

    def check_images(self, ids: np.ndarray, pixels: np.ndarray | None, who: str = "request") -> None:
        """One image per image block of the prompt ``ids``, and no more than the model takes."""
        self._check_image_count(0 if pixels is None else int(pixels.shape[0]), who)
        slots = int((ids == self.image_token_id).sum())
        given = 0 if pixels is None else int(pixels.shape[0]) * self.image_seq_len
        if slots != given:
            raise InputError(f"{who}: prompt has {slots} image tokens but {0 if pixels is None else pixels.shape[0]} "
                             f"image(s) give {given} embeddings ({self.image_seq_len} per image); "
                             "pass one image per image block")


class Engine(PromptCodec):
    def __init__(self, bundle: Bundle, backend: str, threads: int | dict | None = None,
                 device: str | None = None, options: dict | None = None):
        self.bundle, self.backend = bundle, backend
        missing = [p for p in ("vision", "embed", "decoder") if p not in bundle.parts]
        if missing:
            raise BundleError(f"{bundle.path}: the bundle has no {', '.join(missing)} part (it has {sorted(bundle.parts)}); "
                              "a VLM bundle needs vision, embed and decoder: rebuild it with `edgevl export`")
        runner_cls = get_runner_class(backend)
        # threads: one count for every part, or {part: count} (a part left out gets the backend's default)
        per_part = threads if isinstance(threads, dict) else {name: threads for name in bundle.parts}
        self.runners = {
            name: runner_cls(bundle.part_file(name, backend), precision=bundle.precision, threads=per_part.get(name),
                             device=device, options=_part_options(backend, name, options))
            for name in bundle.parts
        }
        # prompts may have a graph of their own (an int8 prefill beside a 4-bit decoder); same cache
        prefill = bundle.prefill_file("decoder", backend) if "decoder" in bundle.parts else None
        self.prefill_runner = None if prefill is None else runner_cls(
            prefill, precision=bundle.precision, threads=per_part.get("decoder"), device=device,
            options=_part_options(backend, "prefill", options))
        super().__init__(bundle)
        m = bundle.manifest
        self.kv_dtype = np.dtype(bundle.kv_dtype(backend))
        # multimodal RoPE (Qwen2-VL/2.5-VL): the decoder takes 3-D positions the runtime computes
        self.mrope = MRoPEPositions(m["mrope"]) if m.get("mrope") else None
        # Gemma 3: the image block attends both ways at prefill (runtimes/image_span.py)
        self.image_bidirectional = bool((self.dec.get("variants") or {}).get("image_bidirectional"))

    # -- parts -------------------------------------------------------------------------------
    def activate(self) -> "Engine":
        for r in self._all_runners():
            r.activate()
        return self

    def close(self) -> None:
        for r in self._all_runners():
            r.close()

    def _all_runners(self) -> list:
        return [*self.runners.values(), *([self.prefill_runner] if self.prefill_runner is not None else [])]

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        fixed = self.preprocess_spec.get("fixed_size")
        if fixed and tuple(pixels.shape[1:]) != (3, *self.preprocess_spec["size"]):
            w, h = fixed["image_size"]
            raise InputError(f"pixel_values of shape {tuple(pixels.shape)}: this bundle encodes one image size, "
                             f"{w}x{h} (chosen when it was built); pass images (they are resized to it) or rebuild "
                             f"the bundle with --image-size for another size")
        embeds = self.runners["vision"].infer({"pixel_values": pixels})["image_embeds"]
        expected = (pixels.shape[0], int(self.prompt_spec["image_seq_len"]))
        if embeds.ndim != 3 or embeds.shape[:2] != expected:
            # seen: OpenVINO on an emulated Cortex-A57 returned (1, 0, D) for a Q/DQ INT8 encoder
            raise BackendError(
                f"{self.backend}: the vision part returned image_embeds of shape {tuple(embeds.shape)} for "
                f"{expected[0]} image(s); expected ({expected[0]}, {expected[1]}, D). The backend computed a "
                f"wrong result on this machine: try another backend (e.g. backend='onnxruntime') or an fp32 bundle")
        return embeds

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return self.runners["embed"].infer({"input_ids": ids})["inputs_embeds"]

    # -- prompts -----------------------------------------------------------------------------
    def merge(self, ids: np.ndarray, image_embeds: np.ndarray | None) -> np.ndarray:
        """(T,) ids -> (1, T, D) embeddings, image-token slots filled with image embeddings in order."""
        embeds = self.embed_tokens(ids[None, :])
        slots = np.flatnonzero(ids == self.image_token_id)
        given = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if len(slots) != given:
            raise InputError(f"prompt has {len(slots)} image tokens but the images give {given} embeddings "
                             f"({self.prompt_spec['image_seq_len']} per image); pass one image per image block")
        if given:
            embeds[0, slots] = image_embeds.reshape(given, -1).astype(embeds.dtype, copy=False)
        return embeds

    # -- cache and steps ---------------------------------------------------------------------
    def new_cache(self, slots: int = 1, capacity: int = 64) -> KVCache:
        """A KV cache for ``slots`` sequences. The decoder's runner may supply its own (the
        TensorRT runner keeps it on the GPU, same interface); otherwise a host KVCache."""
        spec = dict(n_layers=int(self.dec["n_layers"]), n_kv_heads=int(self.dec["n_kv_heads"]),
                    head_dim=int(self.dec["head_dim"]), slots=slots, capacity=capacity,
                    max_capacity=int(self.dec["max_position"]), dtype=self.kv_dtype)
        make = getattr(self.runners["decoder"], "new_kv_cache", None)   # runner-like stand-ins may lack it
        cache = make(**spec) if make is not None else None
        return cache if cache is not None else KVCache(**spec)

    def prefill(self, cache: KVCache, slot: int, embeds: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Run a whole prompt (1, T, D) into ``slot`` (which must be empty); -> logits (V,).
        ``ids`` (T,): the prompt's token ids, which some decoders need (``decoder_extras``)."""
        return self.prefill_rows(cache, slot, embeds, None if ids is None else np.asarray(ids).reshape(1, -1))[0]

    def prefill_rows(self, cache: KVCache, first: int, embeds: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Run ``k`` prompts of the same length (k, T, D) at once into the empty slots
        ``first .. first+k-1``; -> logits (k, V). One call instead of k: the scheduler uses it
        for requests admitted together (cameras asking the same question). ``ids`` (k, T)."""
        rows = slice(first, first + embeds.shape[0])
        if ids is None and self.image_bidirectional:
            raise InputError("this bundle's decoder attends bidirectionally over the image block and finds it in the "
                             "prompt ids: pass ids to Engine.prefill / prefill_rows")
        if ids is None and self.mrope is not None:
            raise InputError("this bundle's decoder takes 3-D positions computed from the prompt's token ids "
                             "(multimodal RoPE); pass ids to Engine.prefill / prefill_rows")
        cache.ensure(int(cache.length[rows].max()) + embeds.shape[1])
        runner = self.prefill_runner if self.prefill_runner is not None and embeds.shape[1] > 1 \
            else self.runners["decoder"]
        out = runner.infer({"inputs_embeds": embeds, **cache.feeds(rows), **self.decoder_extras(cache, rows, ids)})
        cache.write(out, rows)
        return out["logits"]

    def decode(self, cache: KVCache, n: int, tokens: np.ndarray) -> np.ndarray:
        """One token for each of the first ``n`` slots; -> logits (n, V)."""
        rows = slice(0, n)
        cache.ensure(int(cache.length[:n].max()) + 1)
        embeds = self.embed_tokens(tokens.reshape(n, 1).astype(np.int64, copy=False))
        out = self.runners["decoder"].infer({"inputs_embeds": embeds, **cache.feeds(rows),
                                             **self.decoder_extras(cache, rows, None)})
        cache.write(out, rows)
        return out["logits"]

    def decoder_extras(self, cache: KVCache, rows: slice, ids: np.ndarray | None) -> dict:
        """The decoder inputs only some variants have (manifest ``decoder.variants``), for the
        cache ``rows`` of this call: ``ids`` are the prompts' (k, T) ids at prefill, None at decode.

        - multimodal RoPE (Qwen2-VL/2.5-VL): ``position_ids``, 3-D positions from the prompt, its
          per-sequence offset kept in the cache's slot (runtimes/mrope.py);
        - image_bidirectional (Gemma 3): ``image_span``, see runtimes/image_span.py."""
        extras = {}
        if self.mrope is not None:
            if ids is None:
                extras["position_ids"] = self.mrope.decode(cache.length[rows], cache.position_delta[rows])
            else:
                extras["position_ids"], cache.position_delta[rows] = self.mrope.prefill(ids)
        if self.image_bidirectional:
            from edgevl.runtimes.image_span import prompt_spans, step_spans

            lengths = cache.length[rows]
            extras["image_span"] = step_spans(len(lengths)) if ids is None else \
                prompt_spans(ids, self.image_token_id, lengths)
        return extras
