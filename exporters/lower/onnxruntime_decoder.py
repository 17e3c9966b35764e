"""The decoder lowered to ONNX Runtime's fused contrib operators (the form of onnxruntime-genai's
model builder), as a compiled artefact of a bundle: ``parts.decoder.artifacts.onnxruntime``.

Why: a decode step of the portable decoder in ONNX Runtime runs ~40 small nodes per layer (two
attention pieces, masks, RoPE, softmax...) and its attention reads the whole cache capacity.
Lowered, a layer is 11 nodes:

    SkipSimplifiedLayerNormalization   residual add + RMSNorm (SimplifiedLayerNormalization for layer 0)
    MatMul | MatMulNBits | DynamicQuantizeMatMul    stacked q/k/v projection (+ Add for biases)
    GroupQueryAttention                RoPE on q and k (do_rotary, cos/sin tables), the new K/V written
                                       into the KV buffer, causal attention over each row's own length
    (same product kind)                o_proj
    SkipSimplifiedLayerNormalization   residual add + RMSNorm
    (same), Split, Sigmoid, Mul, Mul, (same)          SwiGLU MLP

Interface: the portable decoder's inputs (``inputs_embeds``, ``past_len`` int64,
``past_key.{i}``/``past_value.{i}``); outputs ``logits`` of the last position (B, V) and, per
cache tensor, ``cache_key.{i}``/``cache_value.{i}``: GroupQueryAttention's present buffer,
(B, KV, C, Dh). The model's metadata ``edgevl.kv_in_place`` maps each of them to its past
input. ONNX Runtime's GQA works in place ("past_present_share_buffer") when present and past
are the same memory, so the runner (runtimes/onnxruntime.py) binds each ``cache_*`` output to
the memory of its ``past_*`` input with IOBinding: the step writes its K/V straight into the
runtime's KVCache and attention reads only ``past_len + T`` positions per row. The portable
outputs ``present_key.{i}``/``present_value.{i}`` (the T new positions) are not in the graph:
the runner reads them from the buffers GQA wrote (views), so callers see the portable
interface. Run without the binding (a plain ``session.run``) the graph is still correct: ORT
then copies the past into a fresh present buffer, and the new positions are read from that.

Choices, each checked against ONNX Runtime 1.32 on small graphs (tests/test_lower_onnxruntime.py)
and measured on the SmolVLM-256M-shaped decoder (benchmarks/results/decoder_lowered.md):

- GQA's ``do_rotary`` rotates k *before* caching it, so the new tokens' K is the rotated one and
  lives only in the buffer. Earlier versions gathered it back out per layer (GatherElements x 2
  a layer, ~0.15-0.2 ms of an ~8 ms INT4 step, and ORT runs every node whether its output is
  fetched or not); the runner already holds the buffers, so it takes the new positions from them.
- In place, GQA's time does not depend on the buffer's capacity (~18 us per layer at position
  64, ~90 us at 512, with capacity 128 or 8192 alike); without the shared buffer it grows with it.
  But ORT's CPU kernel multiplies per *query* head (each KV head read n_heads/n_kv_heads times),
  so per position it is slower than the portable graph's grouped products over the capacity:
  measured, the lowered step is 1.13-1.34x faster at positions 64 and 512 alike (the small nodes
  it removes), and falls off with position as much as the portable one does.
- ``query_seqlens`` (= T for every row) makes GQA take each row's past length from
  ``seqlens_k[b] + 1 - T``: rows at different positions, with T > 1 too (without it GQA refuses
  batch > 1 with T > 1 over a non-empty cache). ``total_sequence_length`` is max(past_len) + T.
- The cos/sin tables (max_position, head_dim/2) are ``float32(p) * inv_freq`` with the graph's
  own inverse frequencies, in float32 like the portable graph, so scaled RoPE carries over.
- ``last_only``: the portable graph's logits are the last position's, (B, V); the lowered graph
  normalises every position (the fused op) and gathers position -1 before the LM head.
- Weights are the portable graph's: float32 MatMul, the MatMulNBits of a weight-only decoder
  carried over byte for byte (``lower_decoder(bits=8|4)`` first quantizes the portable decoder
  with weight_only.matmul_nbits, so both graphs of the bundle hold the same blocks), or the int8
  weights and per-column scales of a ``quantize_dynamic`` decoder as ``DynamicQuantizeMatMul``
  (the node ORT's own fusion makes of that pattern; the composite ``int8`` recipe's candidate).
- The SiLU is Sigmoid * x; ORT fuses it itself (QuickGelu with alpha 1).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgevl.bundle import Bundle
from edgevl.errors import ExportError
from edgevl.exporters.lower.portable_decoder import Linear, PortableDecoder, read_portable_decoder
from edgevl.exporters.onnx_io import save_onnx
from edgevl.runtimes.onnxruntime import KV_IN_PLACE_KEY

LOWERED_FILE = "onnxruntime/decoder_lowered.onnx"
OPSET = 17
MAX_IR_VERSION = 10
MS = "com.microsoft"


class _GraphBuilder:
    def __init__(self):
        self.nodes, self.inits = [], []

    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1, domain: str = "", **attrs) -> list[str]:
        from onnx import helper

        name = f"/{op}_{len(self.nodes)}"
        if isinstance(outputs, int):
            outputs = [f"{name}_out{j}" for j in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def linear(self, x: str, lin: Linear, name: str) -> str:
        if lin.weight is not None:
            (y,) = self.node("MatMul", [x, self.const(f"{name}.weight", lin.weight)])
        elif lin.dynamic is not None:        # int8 weights, activations quantized per call (uint8, per tensor)
            dyn = lin.dynamic
            inputs = [x, self.const(f"{name}.weight", dyn["weight"]), self.const(f"{name}.scale", dyn["scale"])]
            if dyn["zero_point"] is not None:
                inputs.append(self.const(f"{name}.zero_point", dyn["zero_point"]))
            (y,) = self.node("DynamicQuantizeMatMul", inputs, domain=MS)
        else:
            inputs = [x]
            for part, arr in zip(("weight", "scales", "zero_points", "g_idx"), lin.nbits["inputs"]):
                inputs.append("" if arr is None else self.const(f"{name}.{part}", arr))
            while inputs[-1] == "":
                inputs.pop()
            (y,) = self.node("MatMulNBits", inputs, domain=MS, **lin.nbits["attrs"])
        if lin.bias is not None:
            (y,) = self.node("Add", [y, self.const(f"{name}.bias", lin.bias)])
        return y


def rope_tables(inv_freq: np.ndarray, max_position: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (max_position, head_dim/2), computed in float32 as the portable graph does."""
    angles = np.arange(max_position, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def lowering_refusal(decoder_spec: dict) -> str | None:
    """Why a decoder (its manifest section) cannot be lowered for ONNX Runtime, or None."""
    from edgevl.models.decoder import llama_graph_blockers

    blockers = llama_graph_blockers(decoder_spec)
    if blockers:
        return (f"the lowering reads Llama-shaped decoders only (q/k/v bias included); this decoder has the "
                f"variants {', '.join(f'{k}={v}' for k, v in blockers.items())}: use the portable one")
    head_dim = int(decoder_spec["head_dim"])
    if head_dim % 16:
        return (f"head_dim {head_dim}: ONNX Runtime's GroupQueryAttention applies RoPE (do_rotary) only to heads "
                "whose size is a multiple of 16; this decoder cannot be lowered, use the portable one")
    return None


def build_lowered(dec: PortableDecoder):
    """The lowered decoder as an onnx.ModelProto (see the module docstring for its form)."""
    from onnx import TensorProto, helper

    refusal = lowering_refusal({"head_dim": dec.head_dim})
    if refusal:
        raise ExportError(refusal)
    b = _GraphBuilder()
    kv, dh, d, n = dec.n_kv_heads, dec.head_dim, dec.hidden_dim, len(dec.layers)
    cos, sin = rope_tables(dec.inv_freq, dec.max_position)
    b.const("rope.cos", cos)
    b.const("rope.sin", sin)
    i64 = lambda name, values: b.const(name, np.asarray(values, np.int64))   # noqa: E731

    # -- shared by every layer: lengths for GQA and the index of the new positions ------------
    (t,) = b.node("Shape", ["inputs_embeds"], start=1, end=2)                              # (1,) = T
    (total_b,) = b.node("Add", ["past_len", t])                                            # (B,)
    (last_pos,) = b.node("Sub", [total_b, i64("one", [1])])
    (seqlens_k,) = b.node("Cast", [last_pos], to=TensorProto.INT32)
    (total_max,) = b.node("ReduceMax", [total_b], keepdims=0)
    (total_len,) = b.node("Cast", [total_max], to=TensorProto.INT32)                       # scalar
    (batch,) = b.node("Shape", ["past_len"])                                               # (1,) = B
    (t_per_row,) = b.node("Expand", [t, batch])
    (query_seqlens,) = b.node("Cast", [t_per_row], to=TensorProto.INT32)

    split = i64("mlp_split", [dec.mlp_dim, dec.mlp_dim])
    eps = float(dec.rms_eps)
    residual, pending = "inputs_embeds", None
    for i, layer in enumerate(dec.layers):
        ln_in = b.const(f"layers.{i}.input_layernorm.weight", layer.input_norm)
        if pending is None:
            (h,) = b.node("SimplifiedLayerNormalization", [residual, ln_in], axis=-1, epsilon=eps, stash_type=1)
        else:
            h, _, _, residual = b.node("SkipSimplifiedLayerNormalization", [pending, residual, ln_in],
                                       [f"/layers.{i}.attn_in", "", "", f"/residual.{i}.attn"], domain=MS, epsilon=eps)
        qkv = b.linear(h, layer.qkv, f"layers.{i}.qkv_proj")
        attn, _, _ = b.node("GroupQueryAttention",
                            [qkv, "", "", f"past_key.{i}", f"past_value.{i}", seqlens_k, total_len, "rope.cos",
                             "rope.sin", "", "", "", "", "", "", "", query_seqlens],
                            [f"/layers.{i}.attn", f"cache_key.{i}", f"cache_value.{i}"], domain=MS,
                            num_heads=dec.n_heads, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0)
        o = b.linear(attn, layer.o, f"layers.{i}.o_proj")
        ln_post = b.const(f"layers.{i}.post_attention_layernorm.weight", layer.post_norm)
        h2, _, _, residual = b.node("SkipSimplifiedLayerNormalization", [o, residual, ln_post],
                                    [f"/layers.{i}.mlp_in", "", "", f"/residual.{i}.mlp"], domain=MS, epsilon=eps)
        gate_up = b.linear(h2, layer.gate_up, f"layers.{i}.gate_up_proj")
        gate, up = b.node("Split", [gate_up, split], 2, axis=-1)
        (sig,) = b.node("Sigmoid", [gate])
        (act,) = b.node("Mul", [gate, sig])
        (prod,) = b.node("Mul", [act, up])
        pending = b.linear(prod, layer.down, f"layers.{i}.down_proj")
    (normed, _, _, _) = b.node("SkipSimplifiedLayerNormalization",
                               [pending, residual, b.const("norm.weight", dec.final_norm)],
                               ["/final_norm", "", "", ""], domain=MS, epsilon=eps)
    (last,) = b.node("Gather", [normed, i64("last", -1)], axis=1)                          # (B, D)
    b.linear(last, dec.lm_head, "lm_head")
    b.nodes[-1].output[0] = "logits"

    f32 = TensorProto.FLOAT
    cache = ["batch", kv, "capacity", dh]
    inputs = [helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", d]),
              helper.make_tensor_value_info("past_len", TensorProto.INT64, ["batch"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", dec.vocab_size])]
    for i in range(n):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", f32, cache))
    for i in range(n):
        for kind in ("key", "value"):
            outputs.append(helper.make_tensor_value_info(f"cache_{kind}.{i}", f32, cache))
    graph = helper.make_graph(b.nodes, "decoder_lowered_onnxruntime", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="edgevl.exporters.lower.onnxruntime_decoder")
    model.ir_version = MAX_IR_VERSION
    in_place = {f"cache_{kind}.{i}": f"past_{kind}.{i}" for i in range(n) for kind in ("key", "value")}
    helper.set_model_props(model, {KV_IN_PLACE_KEY: json.dumps(in_place)})
    return model


def share_lm_head(graph: Path, donor: Path, out: Path) -> dict | None:
    """Write ``graph`` with its LM head (the node that makes ``logits``) replaced by ``donor``'s,
    weights included: the int8 prompt graph of an ``int4`` bundle then computes the first token's
    logits with the 4-bit graph's head instead of holding an int8 copy of a vocabulary-sized
    matrix. Both graphs are lowered (build_lowered): the head reads the last position's hidden
    state (B, D). -> what was swapped, or None when either head is not one node over initializers."""
    import onnx

    model, other = onnx.load(str(graph)), onnx.load(str(donor))

    def head(m):
        node = next((n for n in m.graph.node if "logits" in n.output), None)
        weights = {i.name: i for i in m.graph.initializer}
        if node is None or not all(name in weights for name in node.input[1:] if name):
            return None, weights
        return node, weights

    (mine, my_weights), (theirs, their_weights) = head(model), head(other)
    if mine is None or theirs is None:
        return None
    swapped = onnx.NodeProto()
    swapped.CopyFrom(theirs)
    swapped.name = "/lm_head_shared"
    swapped.input[0] = mine.input[0]
    for k, name in enumerate(theirs.input[1:], 1):
        if name:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(their_weights[name])
            tensor.name = swapped.input[k] = "shared." + name
            model.graph.initializer.append(tensor)
    dropped = set(mine.input[1:]) - {""}
    position = list(model.graph.node).index(mine)
    model.graph.node.remove(mine)
    model.graph.node.insert(position, swapped)
    still_used = {name for n in model.graph.node for name in n.input}
    kept = [t for t in model.graph.initializer if t.name not in dropped or t.name in still_used]
    freed = sum(int(np.prod(my_weights[n].dims)) * onnx.helper.tensor_dtype_to_np_dtype(my_weights[n].data_type).itemsize
                for n in dropped - still_used)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    save_onnx(model, out)
    return {"from": mine.op_type, "to": theirs.op_type, "bytes_dropped": freed}


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def lower_onnx(src: Path, decoder_spec: dict, out: Path) -> dict:
    """Write the lowered form of the portable decoder ONNX ``src`` to ``out``; its weights are
    the portable graph's (float32, or its MatMulNBits carried over as they are)."""
    from edgevl.models.decoder import require_llama_graph

    require_llama_graph(decoder_spec, "ONNX Runtime decoder lowering")     # Qwen2/Gemma/OPT variants: portable
    dec = read_portable_decoder(src, decoder_spec)
    save_onnx(build_lowered(dec), out)
    ops = op_counts(out)
    return {"layers": len(dec.layers), "weights": dec.weight_kinds, "nodes": sum(ops.values()),
            "portable_nodes": sum(dec.source_ops.values()), "ops": ops}


# -- parity and the bundle ----------------------------------------------------------------------
FP32_TOLERANCE = (1e-3, 0.99999)        # (max abs diff of any output, minimum cosine)
NBITS_TOLERANCE = (float("inf"), 0.999)  # accuracy_level 4 rounds activations to int8 per block
KV8_TOLERANCE = (float("inf"), 0.999)    # an int8 KV cache rounds every cached K/V to its channel's step


def parity_feeds(bundle: Bundle, reference, seed: int = 0) -> list[dict]:
    """Decoder feeds that cover the lowered graph's cases, recorded while ``reference`` (the
    portable decoder's runner) generates: prompts of different lengths prefilled one row at a
    time, batched decode steps with the rows at different positions, a batched two-token chunk,
    and a step past the first doubling of the cache. Embeddings come from the bundle's embed part."""
    from edgevl.runtimes.kv_cache import KVCache
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    spec = bundle.manifest["decoder"]
    rng = np.random.default_rng(seed)
    cache = KVCache(int(spec["n_layers"]), int(spec["n_kv_heads"]), int(spec["head_dim"]), slots=2, capacity=16,
                    max_capacity=int(spec["max_position"]))
    feeds: list[dict] = []
    with OnnxRuntimeRunner(bundle.part_file("embed"), threads=reference.threads) as embed:
        def step(rows: slice, n_tokens: int) -> None:
            ids = rng.integers(0, int(spec["vocab_size"]), (rows.stop - rows.start, n_tokens), dtype=np.int64)
            cache.ensure(int(cache.length[rows].max()) + n_tokens)
            f = {"inputs_embeds": embed.infer({"input_ids": ids})["inputs_embeds"], **cache.feeds(rows)}
            feeds.append({k: np.array(v, copy=True) for k, v in f.items()})
            cache.write(reference.infer(f), rows)

        step(slice(0, 1), 9)
        step(slice(1, 2), 4)
        for _ in range(3):
            step(slice(0, 2), 1)
        step(slice(0, 2), 2)
        while int(cache.length.max()) < 66 and int(cache.length.max()) + 8 <= int(spec["max_position"]):
            step(slice(0, 2), 8)                                  # into the grown (doubled) cache
    return feeds


def check_parity(bundle: Bundle, lowered: Path, threads: int | None = None, kv_int8: bool = False):
    """Portable vs lowered decoder in ONNX Runtime on ``parity_feeds``; a PartReport. A graph with
    an int8 KV cache is compared through its float interface (kv_int8.FloatCacheView)."""
    from edgevl.exporters.lower.kv_int8 import FloatCacheView, read_kv_scales
    from edgevl.runtimes.compare import Comparator
    from edgevl.runtimes.onnxruntime import OnnxRuntimeRunner

    atol, min_cos = FP32_TOLERANCE if bundle.precision == "fp32" else NBITS_TOLERANCE
    if kv_int8:
        atol, min_cos = KV8_TOLERANCE
    with OnnxRuntimeRunner(bundle.path / bundle.parts["decoder"]["onnx"], threads=threads) as portable, \
            OnnxRuntimeRunner(lowered, threads=threads) as candidate:
        feeds = parity_feeds(bundle, portable)
        seen = FloatCacheView(candidate, read_kv_scales(lowered)) if kv_int8 else candidate
        return Comparator(atol=atol, min_cosine=min_cos).compare("decoder", portable, seen, feeds,
                                                                 ref_name="portable", cand_name="lowered")


def lower_decoder(bundle, out, bits: int | None = None, block_size: int = 128, force: bool = False,
                  check: bool = True, threads: int | None = None, log=print, kv_cache: str = "float32",
                  calib="world", calib_prompts: int = 8) -> Bundle:
    """Write a copy of ``bundle`` whose decoder has an ONNX Runtime-lowered artefact.

    ``bundle``: a bundle directory or Bundle, FP32 or weight-only (int8-wo / int4-wo: its
    MatMulNBits are carried over). ``bits`` 8 or 4 (FP32 bundles only) first quantizes the
    portable decoder weight-only exactly as ``edgevl quantize --weight-only`` does
    (weight_only.matmul_nbits, symmetric blocks of ``block_size``, accuracy level 4), then lowers
    it, so both graphs hold the same quantized blocks; no accuracy evaluation is run then (use
    weight_only_bundle for the report, then lower its bundle).

    The new bundle at ``out`` keeps the portable decoder as ``parts.decoder.onnx`` and adds
    ``parts.decoder.artifacts.onnxruntime`` = ``onnxruntime/decoder_lowered.onnx`` and
    ``parts.decoder.lowered.onnxruntime`` = {file, from, ops, nodes, portable_nodes, weights,
    parity}. ``kv_cache="int8"`` keeps the lowered graph's KV cache in int8 (exporters/lower/kv_int8.py),
    its scales calibrated on ``calib_prompts`` prompts of ``calib`` through ``bundle``; the manifest
    then says ``parts.decoder.kv_cache.onnxruntime`` = int8. ``check`` compares the two graphs in ONNX Runtime (logits and new K/V on prefill,
    batched decode at different positions, a cache doubling) and raises ParityError past the
    tolerance: 1e-3 max abs / cosine 0.99999 for FP32, cosine 0.999 for MatMulNBits (its
    int8 activation rounding sees slightly different inputs). Written atomically (BundleWriter)."""
    from edgevl import __version__
    from edgevl.exporters.quantize.derive import as_bundle, derived_writer, require_fp32, staged_bundle, tool_versions
    from edgevl.exporters.quantize.recipes import WeightOnlyRecipe
    from edgevl.exporters.quantize.weight_only import matmul_nbits
    from edgevl.runtimes.compare import Comparator

    t0 = time.perf_counter()
    if kv_cache not in ("float32", "int8"):
        raise ExportError(f"kv_cache must be float32 or int8, got {kv_cache!r}")
    src = as_bundle(bundle)
    if "decoder" not in src.parts:
        raise ExportError(f"{src.path} has no decoder part to lower")
    if bits is not None:
        require_fp32(src, f"lowering with bits={bits}")
    elif src.precision not in ("fp32", "int8-wo", "int4-wo"):
        raise ExportError(f"{src.path} is {src.precision}; the ONNX Runtime lowering reads FP32 or weight-only "
                          "(int8-wo / int4-wo) decoders: lower the FP32 bundle, with bits=8 or 4 for weight-only")
    rel = src.parts["decoder"]["onnx"]
    log(f"lower: {src.path} -> {out} (onnxruntime, {src.precision if bits is None else f'int{bits}-wo'})")
    writer = derived_writer(src, out, ["decoder"] if bits else [], force=force)
    try:
        old = writer.manifest["parts"]["decoder"].get("artifacts", {}).pop("onnxruntime", None)
        for stale in [writer.tmp / old, writer.tmp / (old + ".data")] if old else []:   # an earlier lowering
            stale.unlink(missing_ok=True)
        if bits is None:
            portable = src.part_file("decoder")
        else:
            recipe = WeightOnlyRecipe(bits=bits, block_size=block_size, backends=("onnxruntime",)).validate()
            portable = writer.file(rel)
            q = matmul_nbits(src.part_file("decoder"), portable, recipe)
            writer.manifest["precision"] = recipe.precision
            writer.manifest["quantization"] = {
                "scheme": f"weight-only int{bits}, block-wise", "method": "rtn (round to nearest)",
                "parts": {"decoder": {"onnxruntime": q}}, "float_parts": [p for p in src.parts if p != "decoder"],
                "float_nodes": [], "activations": "float", "recipe": recipe.to_dict(), "versions": tool_versions()}
            log(f"  quantized the portable decoder: {q['MatMulNBits']} MatMulNBits ({bits}-bit, block {block_size})")
        info = lower_onnx(portable, src.manifest["decoder"], writer.file(LOWERED_FILE))
        n_layers = info["layers"]
        kv = None
        if kv_cache == "int8":
            from edgevl.exporters.lower.kv_int8 import calibrate_kv_scales, with_int8_kv_cache

            scales = calibrate_kv_scales(src, calib, calib_prompts, threads)
            kv = with_int8_kv_cache(writer.file(LOWERED_FILE), scales, writer.file(LOWERED_FILE))
            kv["calibration"] = f"{calib_prompts} prompts of {calib}"
            log(f"  int8 KV cache: scales from {scales['positions']} cached positions of {calib_prompts} prompts")
        log(f"  lowered: {info['nodes']} nodes ({info['nodes'] / n_layers:.1f} per layer) vs "
            f"{info['portable_nodes']} in the portable graph; weights {', '.join(info['weights'])}")
        entry = {"file": LOWERED_FILE, "from": rel, "ops": sorted(info["ops"]), "nodes": info["nodes"],
                 "portable_nodes": info["portable_nodes"], "weights": info["weights"],
                 "tool": "edgevl.exporters.lower.onnxruntime_decoder", "edgevl": __version__,
                 "onnxruntime": tool_versions().get("onnxruntime")}
        decoder = writer.manifest["parts"]["decoder"]
        decoder.setdefault("artifacts", {})["onnxruntime"] = LOWERED_FILE
        decoder.setdefault("lowered", {})["onnxruntime"] = entry
        kv_types = decoder.setdefault("kv_cache", {})       # a relowered bundle's earlier choice goes
        kv_types.pop("onnxruntime", None)
        if kv is not None:
            entry["kv_cache"], kv_types["onnxruntime"] = kv, "int8"
        if not kv_types:
            del decoder["kv_cache"]
        if writer.manifest.get("quantization"):
            writer.manifest["quantization"].setdefault("artifacts", {})["onnxruntime"] = (
                f"parts.decoder.artifacts.onnxruntime ({LOWERED_FILE}: GroupQueryAttention, the same MatMulNBits)")
        if check:
            report = check_parity(staged_bundle(writer), writer.tmp / LOWERED_FILE, threads, kv_int8=kv is not None)
            worst = report.worst
            entry["parity"] = {"feeds": report.n_feeds, "atol": report.atol if np.isfinite(report.atol) else None,
                               "min_cosine": report.min_cosine,
                               "worst_output": worst.output, "max_abs": worst.max_abs,
                               "cosine": min(o.cosine for o in report.outputs), "passed": report.passed}
            log(f"  parity {report.summary()}")
            Comparator.require(report)
        result = writer.commit()
    except BaseException:
        writer.abort()
        raise
    log(f"lower: wrote {result.path} in {time.perf_counter() - t0:.1f} s")
    return result
