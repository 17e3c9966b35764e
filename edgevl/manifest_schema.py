"""The manifest's schema, with bounds: a hostile manifest cannot make the runtime allocate
without limit (a 10^9-layer KV cache, a 10^12-pixel resize, a gigabyte prompt template).

Types and bounds are declared once, below, as small spec objects; ``validate_manifest`` walks
them and raises BundleError naming the field (``decoder.n_layers``), its value and the limit.
Objects stay open: a field this runtime does not know is left alone (newer exporters add
fields; the schema version says when a field changes meaning). Free-form provenance and
quantization notes are only bounded by the manifest's size.

Why not JSON Schema: the device runtime stays numpy + one backend; these checks are a page.
The bounds are far above any model edgevl targets (a 70B Llama has 80 layers, 128k vocab).
"""

from __future__ import annotations

import math
import re

from edgevl.errors import BundleError

MAX_MANIFEST_BYTES = 16 << 20
MAX_NAME = 256                         # names, dtypes, backend names
MAX_PATH = 1024
MAX_IMAGE_SIDE = 8192
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 20
MAX_FILE_BYTES = 1 << 40


class _Spec:
    def check(self, value, path: str) -> None:
        raise NotImplementedError


def _fail(path: str, value, problem: str):
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise BundleError(f"manifest field {path} = {shown} {problem}; the manifest is damaged or was edited, "
                      "rebuild the bundle")


class Int(_Spec):
    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, value, "is not an integer")
        if not self.lo <= value <= self.hi:
            _fail(path, value, f"is outside the allowed range [{self.lo}, {self.hi}]")


class Num(_Spec):
    def __init__(self, lo: float, hi: float, nonzero: bool = False):
        self.lo, self.hi, self.nonzero = lo, hi, nonzero

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(path, value, "is not a finite number")
        if not self.lo <= value <= self.hi or (self.nonzero and value == 0):
            _fail(path, value, f"is outside the allowed range [{self.lo}, {self.hi}]" + (", nonzero" if self.nonzero else ""))


class Str(_Spec):
    def __init__(self, max_len: int = MAX_NAME, choices=None, pattern: str | None = None, contains: str | None = None):
        self.max_len, self.choices, self.contains = max_len, choices, contains
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, value, path):
        if not isinstance(value, str):
            _fail(path, value, "is not a string")
        if len(value) > self.max_len:
            _fail(path, value, f"is {len(value)} characters long, more than the limit of {self.max_len}")
        if self.choices is not None and value not in self.choices:
            _fail(path, value, f"is not one of {sorted(self.choices)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            _fail(path, value, f"does not match {self.pattern.pattern}")
        if self.contains is not None and self.contains not in value:
            _fail(path, value, f"has no {self.contains} slot")


class Bool(_Spec):
    def check(self, value, path):
        if not isinstance(value, bool):
            _fail(path, value, "is not true or false")


class Anything(_Spec):
    def check(self, value, path):
        pass


class Null(_Spec):
    def check(self, value, path):
        if value is not None:
            _fail(path, value, "is not null")


class OneOf(_Spec):
    def __init__(self, *specs: _Spec):
        self.specs = specs

    def check(self, value, path):
        for spec in self.specs:
            try:
                spec.check(value, path)
                return
            except BundleError:
                pass
        _fail(path, value, "has the wrong type")


class List(_Spec):
    def __init__(self, item: _Spec, max_len: int, min_len: int = 0):
        self.item, self.max_len, self.min_len = item, max_len, min_len

    def check(self, value, path):
        if not isinstance(value, list):
            _fail(path, value, "is not a list")
        if not self.min_len <= len(value) <= self.max_len:
            _fail(path, value, f"has {len(value)} items, expected {self.min_len} to {self.max_len}")
        for i, item in enumerate(value):
            self.item.check(item, f"{path}[{i}]")


class Obj(_Spec):
    """An object with known ``fields`` ({name: (spec, required)}); other keys are checked with
    ``extra`` (any name, bounded count) or left alone when ``extra`` is None."""

    def __init__(self, fields: dict | None = None, extra: _Spec | None = None, max_keys: int = 4096):
        self.fields, self.extra, self.max_keys = fields or {}, extra, max_keys

    def check(self, value, path):
        if not isinstance(value, dict):
            _fail(path, value, "is not an object")
        if len(value) > self.max_keys:
            _fail(path, f"<{len(value)} keys>", f"has more than {self.max_keys} keys")
        for name, (spec, required) in self.fields.items():
            if name in value:
                spec.check(value[name], f"{path}.{name}" if path else name)
            elif required:
                raise BundleError(f"manifest field {path + '.' if path else ''}{name} is missing; "
                                  "the manifest is damaged or was edited, rebuild the bundle")
        if self.extra is not None:
            for name, item in value.items():
                if name not in self.fields:
                    Str(MAX_NAME).check(name, f"{path} key")
                    self.extra.check(item, f"{path}.{name}")


def req(spec: _Spec) -> tuple:
    return spec, True


def opt(spec: _Spec) -> tuple:
    return spec, False


TOKEN_ID = Int(0, MAX_VOCAB)
PATH = Str(MAX_PATH)
DIM = OneOf(Int(0, 1 << 31), Str(MAX_NAME))
TENSOR = Obj({"name": req(Str(MAX_NAME)), "dtype": req(Str(64)), "shape": req(List(DIM, 8))})
PART = Obj({"onnx": req(PATH), "inputs": opt(List(TENSOR, 4096)), "outputs": opt(List(TENSOR, 4096)),
            "artifacts": opt(Obj(extra=PATH, max_keys=16)), "precision": opt(Str()), "method": opt(Str(4096)),
            "prefill": opt(Obj(extra=PATH, max_keys=16)), "prefill_method": opt(Str(4096)),
            "kv_cache": opt(Obj(extra=Str(16, choices={"float32", "float16", "int8"}), max_keys=16))})
SIZE = Int(1, MAX_IMAGE_SIDE)

MANIFEST_SCHEMA = Obj({
    "format": req(Str(64)),
    "schema_version": req(Int(1, 1 << 16)),
    "model": opt(Obj({"name": opt(Str()), "family": opt(Str()), "architecture": opt(Str())})),
    "precision": opt(Str()),
    "target": opt(Str()),
    "parts": req(Obj(extra=PART, max_keys=16)),      # which parts a runtime needs is its own check
    "decoder": req(Obj({
        "n_layers": req(Int(1, 1024)),
        "n_kv_heads": req(Int(1, 1024)),
        "head_dim": req(Int(1, 4096)),
        "hidden_dim": opt(Int(1, 1 << 16)),
        "vocab_size": req(Int(1, MAX_VOCAB)),
        "max_position": req(Int(1, MAX_CONTEXT)),
        "kv_dtype": opt(Str(choices={"float32", "float16"})),
    })),
    "preprocess": req(Obj({
        "size": req(List(SIZE, 2, 2)),
        "resize_mode": opt(Str(64)),
        "interpolation": opt(Str(64)),
        "resize_shortest": opt(SIZE), "resize_longest": opt(SIZE), "min_size": opt(SIZE),
        "pad_value": opt(List(Int(0, 255), 3, 3)),
        "rescale": opt(Num(-1e6, 1e6)),
        "mean": req(List(Num(-1e6, 1e6), 3, 3)),
        "std": req(List(Num(-1e6, 1e6, nonzero=True), 3, 3)),
        "channel_order": opt(Str(8)),
    })),
    "tokenizer": req(Obj({"file": req(PATH), "bos_token_id": opt(OneOf(TOKEN_ID, Null())),
                          "eos_token_ids": opt(List(TOKEN_ID, 64)), "pad_token_id": opt(OneOf(TOKEN_ID, Null())),
                          "add_special_tokens": opt(Bool())})),
    "prompt": req(Obj({
        "template": req(Str(1 << 16, contains="{prompt}")),
        "image_block": req(Str(1 << 20)),
        "image_token_id": req(TOKEN_ID),
        "image_seq_len": req(Int(0, 1 << 16)),
    })),
    "generation": opt(Obj({
        "max_new_tokens": opt(Int(1, MAX_CONTEXT)), "temperature": opt(Num(0, 1e6)), "top_k": opt(Int(0, MAX_VOCAB)),
        "top_p": opt(Num(0, 1)), "repetition_penalty": opt(Num(0, 1e6, nonzero=True)),
        "seed": opt(OneOf(Int(0, (1 << 63) - 1), Null())), "stop_token_ids": opt(List(TOKEN_ID, 64)),
    })),
    "mrope": opt(Obj({     # multimodal RoPE positions (runtimes/mrope.py): the image token and its merged grid
        "section": opt(List(Int(1, 4096), 3, 3)),
        "image_token_id": req(TOKEN_ID),
        "video_token_id": opt(TOKEN_ID),
        "grid": req(List(Int(1, MAX_IMAGE_SIDE), 2, 2)),
        "image_size": opt(List(SIZE, 2, 2)),
    })),
    "reports": opt(Obj(extra=PATH, max_keys=64)),
    "files": req(Obj(extra=Obj({"sha256": req(Str(64, pattern="[0-9a-f]{64}")), "bytes": req(Int(0, MAX_FILE_BYTES))}),
                     max_keys=100_000)),
})


def validate_manifest(manifest) -> None:
    """Raise BundleError naming the first field that breaks the schema or its bounds."""
    MANIFEST_SCHEMA.check(manifest, "")
