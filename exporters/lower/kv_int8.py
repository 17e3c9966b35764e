"""An int8 KV cache for the ONNX Runtime-lowered decoder (GroupQueryAttention's quantized cache).

Why: a decode step reads the whole cache of every layer. With float32 K/V the SmolVLM-shaped
decoder (30 layers, 3 KV heads of 64) reads 46 KB a position, 23.6 MB a step at position 512;
GroupQueryAttention's share of an INT8 step grew from 0.75 ms at position 64 to 2.49 ms at 512
(ORT profile, 2-core AMD EPYC), and the step rate fell to 0.79x. ORT 1.32's CPU kernel can keep
the cache in int8 (``k_quant_type``/``v_quant_type`` = ``PER_CHANNEL``, ``kv_cache_bit_width`` 8,
``k_scale``/``v_scale`` inputs): it quantizes the new K/V as it writes them and dequantizes as it
reads. One GQA node at position 512 ran 0.082 ms with the int8 cache against 0.142 ms in float,
and the cache takes a quarter of the memory.

Scales are static (the kernel takes them as inputs), one per KV head and channel, calibrated on
the decoder's real inputs (prompts with images through the FP32 bundle):

- K is cached *after* RoPE (``do_rotary``), which rotates channel ``i`` with ``i + head_dim/2``
  by a position-dependent angle. The pair's magnitude ``sqrt(k_i^2 + k_{i+h}^2)`` does not change
  under rotation, so it bounds both channels at every position, including positions the
  calibration never reached. Both channels of a pair get the scale of that bound.
- V: the absolute maximum per channel.
- Both times ``KV_MARGIN`` for tokens larger than the calibration's; values beyond saturate at
  +-127 (the kernel clamps).
- No channel's scale falls below ``HEAD_FLOOR`` of its head's largest: a channel that stayed
  small on a few calibration prompts is the one a new prompt overflows most.

Chosen on edgevl-tiny (logits cosine vs the float cache, worst feed; 8 held-out prompts x 8 steps
/ the lowering's random-token parity feeds), 4 calibration prompts: per channel, margin 1.25:
0.99925 / 0.99152; margin 2: 0.99997 / 0.99949; one scale per head: 0.99999 / 0.99982;
margin 1.5 with the 0.5 floor: 0.99998 / 0.99988 (16 prompts: 0.99999 / 0.99995).

The layout ONNX Runtime expects (checked on small graphs, tests/test_kv_int8.py): the scales are
(n_kv_heads * head_dim) values in head-major order, quantized = round(x / scale).

The bundle's composite recipe decides by measurement whether a lowered decoder keeps its cache in
int8 (exporters/quantize/composite.py): the gate is the decoder's logits cosine vs FP32 and a
decode step at a long cache must be faster. The manifest says so under
``parts.decoder.kv_cache.onnxruntime`` = ``"int8"``; the engine then makes int8 caches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevl.errors import ExportError

KV_MARGIN = 1.5                    # headroom over the calibrated maximum
HEAD_FLOOR = 0.5                   # a channel's scale >= this share of its head's largest
KV_DTYPE_KEY = "edgevl.kv_dtype"   # model metadata of a graph whose cache inputs are int8
QMAX = 127


def kv_scales(feeds: list[dict], n_layers: int, head_dim: int, margin: float = KV_MARGIN,
              head_floor: float = HEAD_FLOOR) -> dict[str, np.ndarray]:
    """Per-layer scales {"key": (L, KV, Dh), "value": (L, KV, Dh)} float32 from recorded decoder
    feeds (each holds the cache written so far: ``past_*`` up to ``past_len`` of each row)."""
    if head_dim % 2:
        raise ExportError(f"head_dim {head_dim} is odd: RoPE pairs channels, an int8 K cache needs an even head_dim")
    half = head_dim // 2
    k_max = v_max = None
    seen = 0
    for f in feeds:
        lengths = np.asarray(f["past_len"]).reshape(-1)
        for row, n in enumerate(lengths.tolist()):
            if n <= 0:
                continue
            seen += n
            k = np.stack([f[f"past_key.{i}"][row, :, :n] for i in range(n_layers)])      # (L, KV, n, Dh)
            v = np.stack([f[f"past_value.{i}"][row, :, :n] for i in range(n_layers)])
            pair = np.sqrt(k[..., :half] ** 2 + k[..., half:] ** 2).max(axis=2)          # (L, KV, Dh/2)
            kk = np.concatenate([pair, pair], axis=-1)
            vv = np.abs(v).max(axis=2)
            k_max = kk if k_max is None else np.maximum(k_max, kk)
            v_max = vv if v_max is None else np.maximum(v_max, vv)
    if k_max is None:
        raise ExportError("no cached positions in the calibration feeds: record decode steps (past_len > 0) "
                          "to calibrate an int8 KV cache")
    out = {"positions": seen}
    for kind, peak in (("key", k_max), ("value", v_max)):
        peak = np.maximum(peak, head_floor * peak.max(axis=-1, keepdims=True))
        out[kind] = np.maximum(peak * margin / QMAX, 1e-6).astype(np.float32)
    return out


def calibrate_kv_scales(bundle, calib="world", prompts: int = 8, threads: int | None = None) -> dict:
    """``kv_scales`` from the caches ``bundle`` (its FP32 or weight-only decoder, through the
    runtime) writes for ``prompts`` prompts with images of the calibration source ``calib``."""
    from edgevl.exporters.quantize.calibration import parse_source
    from edgevl.exporters.quantize.decoder_feeds import part_feeds

    spec = bundle.manifest["decoder"]
    feeds = part_feeds(bundle, parse_source(calib), ["decoder"], 0, prompts, 1, threads)["decoder"]
    return kv_scales(feeds, int(spec["n_layers"]), int(spec["head_dim"]))


def quantize_cache(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """A float cache tensor (B, KV, C, Dh) in the int8 layout the kernel writes, with ``scale`` (KV, Dh)."""
    return np.clip(np.rint(x / scale[None, :, None, :]), -QMAX, QMAX).astype(np.int8)


def int8_feeds(feeds: dict, scales: dict) -> dict:
    """A decoder feed whose float ``past_*`` caches are replaced by their int8 form (fresh,
    writable arrays: GroupQueryAttention writes into them)."""
    out = {}
    for name, value in feeds.items():
        kind, _, layer = name.partition(".")
        if kind in ("past_key", "past_value"):
            value = quantize_cache(value, scales["key" if kind == "past_key" else "value"][int(layer)])
        out[name] = value
    return out


def with_int8_kv_cache(src: Path, scales: dict, out: Path) -> dict:
    """Rewrite the lowered decoder ``src`` (exporters.lower.onnxruntime_decoder.build_lowered) so
    its KV cache is int8: every GroupQueryAttention gets per-channel int8 quantization and its
    layer's scales, and the cache inputs/outputs become int8. Weights are untouched."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgevl.exporters.onnx_io import save_onnx

    model = onnx.load(str(src))
    graph = model.graph
    n_layers = scales["key"].shape[0]
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if len(gqa) != n_layers:
        raise ExportError(f"{src}: {len(gqa)} GroupQueryAttention nodes for {n_layers} layers of scales; "
                          "only a lowered decoder (edgevl.exporters.lower) can take an int8 KV cache")
    for node in gqa:
        layer = int(node.output[1].rpartition(".")[2])            # cache_key.{i}
        if any(a.name in ("k_quant_type", "kv_cache_bit_width") for a in node.attribute):
            raise ExportError(f"{src}: layer {layer}'s KV cache is already quantized")
        inputs = list(node.input) + [""] * (14 - len(node.input))
        for j, kind in ((12, "key"), (13, "value")):              # k_scale, v_scale
            name = f"layers.{layer}.{kind}_cache_scale"
            graph.initializer.append(numpy_helper.from_array(scales[kind][layer].reshape(-1), name))
            inputs[j] = name
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
    for value in list(graph.input) + list(graph.output):
        if value.name.startswith(("past_key.", "past_value.", "cache_key.", "cache_value.")):
            value.type.tensor_type.elem_type = TensorProto.INT8
    props = {p.key: p.value for p in model.metadata_props}
    props[KV_DTYPE_KEY] = "int8"
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    save_onnx(model, out)
    return {"dtype": "int8", "layers": n_layers, "granularity": "per KV head and channel (K: per RoPE pair)",
            "margin": KV_MARGIN, "head_floor": HEAD_FLOOR, "calibration_positions": int(scales.get("positions", 0)),
            "key_scale_range": [float(scales["key"].min()), float(scales["key"].max())],
            "value_scale_range": [float(scales["value"].min()), float(scales["value"].max())]}


def read_kv_scales(path: Path) -> dict[str, np.ndarray]:
    """The scales a graph written by ``with_int8_kv_cache`` holds -> {"key", "value"}: (L, KV*Dh)."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in onnx.load(str(path), load_external_data=False).graph.initializer
             if t.name.endswith("_cache_scale")}
    out = {}
    for kind in ("key", "value"):
        n = sum(1 for name in inits if name.endswith(f".{kind}_cache_scale"))
        if n == 0:
            raise ExportError(f"{path}: no int8 KV cache scales in the graph")
        out[kind] = np.stack([numpy_helper.to_array(inits[f"layers.{i}.{kind}_cache_scale"]) for i in range(n)])
    return out


class FloatCacheView:
    """A runner of an int8-KV decoder graph seen with the portable (float) interface, for reports
    and parity checks: float ``past_*`` feeds are quantized as the kernel would store them, and
    the step's ``present_*`` come back dequantized."""

    def __init__(self, runner, scales: dict):
        self.runner = runner
        self.scales = {kind: scales[kind] for kind in ("key", "value")}      # (L, KV * Dh)

    def infer(self, feeds: dict) -> dict:
        kv = feeds["past_key.0"].shape[1]
        shaped = {kind: s.reshape(s.shape[0], kv, -1) for kind, s in self.scales.items()}     # (L, KV, Dh)
        out = dict(self.runner.infer(int8_feeds(feeds, shaped)))
        for name, value in out.items():
            kind, _, layer = name.partition(".")
            if kind in ("present_key", "present_value"):
                s = shaped["key" if kind == "present_key" else "value"][int(layer)]
                out[name] = value.astype(np.float32) * s[None, :, None, :]
        return out

    def close(self) -> None:
        self.runner.close()
