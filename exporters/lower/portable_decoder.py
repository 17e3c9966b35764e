"""Read a portable decoder ONNX (``exporters.onnx_export.export_decoder``) back into its weights.

Every portable decoder is traced from ``edgevl.models.decoder.Decoder`` inside
``DecoderForExport``, so its nodes carry the module scopes as names: the product of layer 3's
stacked q/k/v is ``/decoder/layers.3/self_attn/qkv_proj/MatMul`` (``..._Q8`` after
MatMulNBitsQuantizer), its RMSNorm scale is the constant operand of a Mul under
``/decoder/layers.3/input_layernorm/``, and the rotary inverse frequencies are the constant of
``/decoder/rotary/Mul`` (read, not recomputed, so linear/llama3-scaled tables carry over). The
reader finds the weights by those scopes and checks every shape against the manifest's decoder
spec; a graph it cannot account for raises ExportError rather than lowering to something else.

Weights come as float32 (K, N) matrices, as the packed inputs of a ``MatMulNBits`` node
(weight-only int8/int4 bundles), or as the int8 matrix and per-column scales of a
``MatMulInteger`` that ``onnxruntime.quantization.quantize_dynamic`` wrote (its nodes keep the
scope: ``.../qkv_proj/MatMul_quant``, the scales in ``.../MatMul_quant_scales_mul``, the result
out of ``.../MatMul_quant_output_scale_mul``), all carried over untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgevl.errors import ExportError

_LINEAR = re.compile(r"^/decoder/(?:layers\.(\d+)/(?:self_attn|mlp)/)?"
                     r"(qkv_proj|q_proj|k_proj|v_proj|o_proj|gate_up_proj|gate_proj|up_proj|down_proj|lm_head)"
                     r"/MatMul(?:_Q\d+|_quant)?$")
_NORM = re.compile(r"^/decoder/(?:layers\.(\d+)/)?(input_layernorm|post_attention_layernorm|norm)/")


@dataclass
class Linear:
    """One weight product ``x @ W (+ bias)``: ``weight`` (K, N) float32, ``nbits`` = the
    attributes and packed inputs (B, scales, zero_points, g_idx) of a MatMulNBits node, or
    ``dynamic`` = {"weight": int8 (K, N), "scale": (N,) or (), "zero_point": like scale} of a
    dynamically quantized product (activations quantized per call)."""
    k: int
    n: int
    weight: np.ndarray | None = None
    nbits: dict | None = None
    bias: np.ndarray | None = None
    dynamic: dict | None = None

    @property
    def kind(self) -> str:
        if self.weight is not None:
            return "float"
        return "DynamicQuantizeMatMul8" if self.dynamic is not None else f"MatMulNBits{self.nbits['attrs']['bits']}"


@dataclass
class Layer:
    input_norm: np.ndarray
    post_norm: np.ndarray
    qkv: Linear                      # q, k, v stacked along N (the export layout)
    o: Linear
    gate_up: Linear                  # gate, up stacked along N
    down: Linear


@dataclass
class PortableDecoder:
    layers: list[Layer]
    final_norm: np.ndarray
    lm_head: Linear
    inv_freq: np.ndarray             # (head_dim / 2,) float32, as the graph multiplies positions by it
    rms_eps: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    mlp_dim: int
    vocab_size: int
    max_position: int
    source_ops: dict = field(default_factory=dict)

    @property
    def weight_kinds(self) -> list[str]:
        return sorted({lin.kind for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)}
                      | {self.lm_head.kind})


class _Graph:
    """Constants (initializers and Constant nodes) and consumers of one ONNX graph."""

    def __init__(self, model):
        from onnx import numpy_helper

        graph = model.graph
        self.nodes = list(graph.node)
        self.const = {t.name: t for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.const[node.output[0]] = node.attribute[0].t
            elif node.op_type == "Identity" and node.input[0] in self.const:
                # the exporter stores equal tensors once (e.g. RMSNorm scales all 1) behind Identity nodes
                self.const[node.output[0]] = self.const[node.input[0]]
        self._np = numpy_helper.to_array
        self.by_name = {node.name: node for node in self.nodes}
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def array(self, name: str) -> np.ndarray | None:
        t = self.const.get(name)
        return None if t is None else self._np(t)

    def constant_operand(self, node) -> np.ndarray | None:
        for name in node.input:
            if name in self.const:
                return self.array(name)
        return None


def _linear(g: _Graph, node, scope: str) -> Linear:
    if node.op_type == "MatMul":
        w = g.array(node.input[1])
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            raise ExportError(f"{node.name}: the weight is not a float32 constant matrix; lowering reads FP32 or "
                              "MatMulNBits (weight-only) decoders, not Q/DQ or FP16 ones: lower the FP32 bundle")
        lin = Linear(int(w.shape[0]), int(w.shape[1]), weight=w)
        out = node.output[0]
    elif node.op_type == "MatMulInteger":
        lin, out = _dynamic_linear(g, node)
    else:
        attrs = {a.name: a.i for a in node.attribute}
        inputs = [g.array(name) if name else None for name in node.input[1:]]
        if inputs[0] is None or inputs[1] is None:
            raise ExportError(f"{node.name}: MatMulNBits weights are not constants")
        bias = inputs[4] if len(inputs) > 4 else None
        lin = Linear(int(attrs["K"]), int(attrs["N"]), nbits={"attrs": attrs, "inputs": inputs[:4]}, bias=bias)
        out = node.output[0]
    for consumer in g.consumers.get(out, []):      # a bias is an Add in the same module scope
        if consumer.op_type == "Add" and consumer.name.startswith(scope + "/"):
            b = g.constant_operand(consumer)
            if b is not None and b.shape == (lin.n,):
                lin.bias = b.astype(np.float32)
    return lin


def _dynamic_linear(g: _Graph, node) -> tuple[Linear, str]:
    """quantize_dynamic's ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale)``:
    the int8 weight, its zero point and its scale (the constant operand of ``<name>_scales_mul``);
    -> (Linear, the name of the product's float output)."""
    w, zp = g.array(node.input[1]), g.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    scales = [n for n in [g.by_name.get(node.name + "_scales_mul")] if n is not None and n.op_type == "Mul"]
    cast = g.consumers.get(node.output[0], [])
    final = g.consumers.get(cast[0].output[0], []) if len(cast) == 1 and cast[0].op_type == "Cast" else []
    scale = g.constant_operand(scales[0]) if scales else None
    if w is None or w.ndim != 2 or w.dtype != np.int8 or scale is None or len(final) != 1 or \
            final[0].op_type != "Mul" or (zp is not None and np.any(zp != 0)):
        raise ExportError(f"{node.name}: not the symmetric int8 MatMulInteger pattern that quantize_dynamic writes "
                          "(int8 constant weight, zero points 0, a constant weight scale); lower the FP32 bundle")
    n = int(w.shape[1])
    if scale.size not in (1, n):
        raise ExportError(f"{node.name}: weight scale of {scale.size} values for {n} columns")
    dyn = {"weight": w, "scale": scale.astype(np.float32).reshape(-1 if scale.size > 1 else ()),
           "zero_point": None if zp is None else zp.reshape(-1 if zp.size > 1 else ())}
    return Linear(int(w.shape[0]), n, dynamic=dyn), final[0].output[0]


def _stack(parts: list[Linear], what: str) -> Linear:
    """q/k/v (or gate/up) exported as separate products: one Linear with them side by side."""
    if any(p.weight is None for p in parts):
        raise ExportError(f"{what}: separate quantized projections cannot be stacked; lower the FP32 bundle")
    weight = np.concatenate([p.weight for p in parts], axis=1)
    bias = None if parts[0].bias is None else np.concatenate([p.bias for p in parts])
    return Linear(parts[0].k, int(weight.shape[1]), weight=weight, bias=bias)


def read_portable_decoder(path: str | Path, decoder_spec: dict) -> PortableDecoder:
    """Weights and settings of a portable decoder ONNX; ``decoder_spec`` is the manifest's
    ``decoder`` section (n_layers, n_kv_heads, head_dim, hidden_dim, vocab_size, max_position)."""
    import onnx

    model = onnx.load(str(path))
    g = _Graph(model)
    n_layers, kv, dh = int(decoder_spec["n_layers"]), int(decoder_spec["n_kv_heads"]), int(decoder_spec["head_dim"])
    d, vocab = int(decoder_spec["hidden_dim"]), int(decoder_spec["vocab_size"])
    linears: dict[tuple, Linear] = {}
    norms: dict[tuple, np.ndarray] = {}
    eps = inv_freq = None
    ops: dict[str, int] = {}
    for node in g.nodes:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            raise ExportError(f"{path}: the decoder holds Q/DQ nodes ({node.name}); lowering reads FP32 or "
                              "weight-only (MatMulNBits) decoders: lower the FP32 bundle")
        m = _LINEAR.match(node.name)
        if m and node.op_type in ("MatMul", "MatMulNBits", "MatMulInteger"):
            key = (int(m.group(1)) if m.group(1) else None, m.group(2))
            linears[key] = _linear(g, node, node.name.rsplit("/", 1)[0])
            continue
        m = _NORM.match(node.name)
        if m and node.op_type == "Mul":
            w = g.constant_operand(node)
            if w is not None and w.shape == (d,):
                norms[(int(m.group(1)) if m.group(1) else None, m.group(2))] = w.astype(np.float32)
            continue
        if m and node.op_type == "Add" and eps is None:
            c = g.constant_operand(node)
            if c is not None and c.size == 1:
                eps = float(c.reshape(()))
            continue
        if node.name.startswith("/decoder/rotary/") and node.op_type == "Mul":
            c = g.constant_operand(node)
            if c is not None and c.shape == (dh // 2,):
                inv_freq = c.astype(np.float32)

    def need(key, table, what):
        if key not in table:
            where = f"layer {key[0]} " if key[0] is not None else ""
            raise ExportError(f"{path}: found no {where}{what} ({key[1]}); is this a decoder exported by edgevl "
                              "(edgevl export)? Re-export the bundle with this edgevl version")
        return table[key]

    layers = []
    for i in range(n_layers):
        if (i, "qkv_proj") in linears:
            qkv = linears[(i, "qkv_proj")]
        else:
            qkv = _stack([need((i, p), linears, "projection") for p in ("q_proj", "k_proj", "v_proj")],
                         f"layer {i} qkv")
        if (i, "gate_up_proj") in linears:
            gate_up = linears[(i, "gate_up_proj")]
        else:
            gate_up = _stack([need((i, p), linears, "projection") for p in ("gate_proj", "up_proj")], f"layer {i} mlp")
        layers.append(Layer(need((i, "input_layernorm"), norms, "RMSNorm scale"),
                            need((i, "post_attention_layernorm"), norms, "RMSNorm scale"),
                            qkv, need((i, "o_proj"), linears, "projection"), gate_up,
                            need((i, "down_proj"), linears, "projection")))
    if (n_layers, "qkv_proj") in linears or (n_layers, "q_proj") in linears:
        raise ExportError(f"{path}: the graph has more than the manifest's {n_layers} layers")
    if eps is None or inv_freq is None:
        raise ExportError(f"{path}: found no {'RMSNorm epsilon' if eps is None else 'rotary inverse frequencies'}; "
                          "re-export the bundle with this edgevl version")
    n_heads = layers[0].qkv.n // dh - 2 * kv
    out = PortableDecoder(layers, need((None, "norm"), norms, "final RMSNorm scale"),
                          need((None, "lm_head"), linears, "LM head"), inv_freq, eps, n_heads, kv, dh, d,
                          layers[0].gate_up.n // 2, vocab, int(decoder_spec["max_position"]), ops)
    _check_shapes(out, path)
    return out


def _check_shapes(dec: PortableDecoder, path) -> None:
    d, dh, q = dec.hidden_dim, dec.head_dim, dec.n_heads * dec.head_dim
    expected = {"qkv": (d, q + 2 * dec.n_kv_heads * dh), "o": (q, d), "gate_up": (d, 2 * dec.mlp_dim),
                "down": (dec.mlp_dim, d)}
    if dec.n_heads <= 0 or dec.n_heads % dec.n_kv_heads:
        raise ExportError(f"{path}: q/k/v width {dec.layers[0].qkv.n} does not split into query heads that group "
                          f"over {dec.n_kv_heads} KV heads of {dh}")
    for i, layer in enumerate(dec.layers):
        for name, shape in expected.items():
            lin = getattr(layer, name)
            if (lin.k, lin.n) != shape:
                raise ExportError(f"{path}: layer {i} {name} is {lin.k}x{lin.n}, expected {shape[0]}x{shape[1]} "
                                  "from the manifest's decoder spec")
    if (dec.lm_head.k, dec.lm_head.n) != (d, dec.vocab_size):
        raise ExportError(f"{path}: the LM head is {dec.lm_head.k}x{dec.lm_head.n}, expected {d}x{dec.vocab_size}")
