"""Which nodes of a part stay in float, by rule, with the reason for each.

Only the compute-heavy ops are quantized (MatMul, Gemm, Conv: the recipe's ``op_types``). Where
Q/DQ nodes sit decides the speed as much as the accuracy: quantizing everything ONNX Runtime can
(QLinearSoftmax, quantized Add/Mul...) made a small ViT 1.5-1.8x *slower* than FP32
(../shared/MEASURED.md item 8), and those ops carry little of the compute. So by rule:

- norms (LayerNormalization, decomposed RMSNorm: ReduceMean/Pow/Sqrt...) stay float: their
  statistics over a whole row are sensitive to rounding and they are cheap;
- Softmax stays float: its output range [0, 1] is quantized at its consumer's input instead;
- the LM head (the last MatMul before ``logits``) stays float when quantizing it hurts (the
  "auto" rule measures top-1 agreement of the logits), because every output token depends on it
  and a wrong argmax is a wrong word;
- the decoder's attention MatMuls (activation x activation: scores against the KV cache,
  probabilities x values) stay float: per-tensor int8 of softmax probabilities and of a cache
  that is mostly padding cost most of the decoder's error (measured, ORT 1.31: logits cosine vs
  FP32 0.982 with them int8, 0.9996 without), OpenVINO 2026.4 computes them differently from
  the Q/DQ semantics (cosine 0.79 vs ONNX Runtime on the same graph), and decode time goes to
  the weight MatMuls, not to these. The vision encoder's attention MatMuls are quantized
  (no cache; both backends agree, cosine 0.9987);
- the embed part is never quantized (a table lookup; no compute to speed up);
- nodes matching the recipe's ``extra_float`` patterns, and nodes the sensitivity pass picks.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization",
            "ReduceMean", "GroupNormalization", "InstanceNormalization", "BatchNormalization")
SOFTMAX_OPS = ("Softmax", "LogSoftmax")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class FloatNode:
    name: str
    op: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _producers(graph) -> dict[str, object]:
    return {out: node for node in graph.node for out in node.output}


def lm_head_node(model, output: str = "logits") -> str | None:
    """The last MatMul/Gemm on the path to ``output`` (None if the graph has no such output)."""
    graph = model.graph
    if output not in {o.name for o in graph.output}:
        return None
    producers = _producers(graph)
    frontier, seen = [output], set()
    while frontier:
        tensor = frontier.pop()
        node = producers.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits"):
            return node.name
        frontier.extend(node.input[:1])      # follow the data input, not shapes or constants
    return None


def quantizable_nodes(model, op_types=WEIGHT_OPS) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in op_types]


def activation_matmuls(model) -> list[str]:
    """MatMuls with no constant operand (attention scores and probabilities x values)."""
    constant = {t.name for t in model.graph.initializer}
    constant |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in constant for i in n.input)]


def rule_float_nodes(model, extra_patterns=(), lm_head_float: bool = False,
                     attention_float: bool = False) -> list[FloatNode]:
    """Norms, softmax, the LM head (when ``lm_head_float``), activation x activation MatMuls (when
    ``attention_float``: the decoder's attention over its KV cache) and ``extra_patterns``."""
    out = []
    attention = set(activation_matmuls(model)) if attention_float else set()
    for n in model.graph.node:
        if n.name in attention:
            out.append(FloatNode(n.name, n.op_type, "decoder attention (activation x activation over the KV cache)"))
        elif n.op_type in NORM_OPS:
            out.append(FloatNode(n.name, n.op_type, "norm: row statistics are rounding-sensitive and cheap"))
        elif n.op_type in SOFTMAX_OPS:
            out.append(FloatNode(n.name, n.op_type, "softmax: quantized at its consumer's input instead"))
        elif any(fnmatch.fnmatchcase(n.name, p) for p in extra_patterns):
            out.append(FloatNode(n.name, n.op_type, "matches the recipe's extra_float patterns"))
    head = lm_head_node(model)
    if lm_head_float and head and not any(f.name == head for f in out):
        op = next(n.op_type for n in model.graph.node if n.name == head)
        out.append(FloatNode(head, op, "LM head: quantizing it changed the top-1 token too often"))
    return out
