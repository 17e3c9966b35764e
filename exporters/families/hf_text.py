"""A Hugging Face language model -> edgevl's ``Decoder``, sharing the weights.

Every HF family ends in a decoder-only language model. Rather than exporting each family's
own attention code (dynamic caches, mask helpers, SDPA variants), its weights are put into
``edgevl.models.decoder.Decoder``: every bundle then has the same decoder graph and the same
fixed-capacity KV-cache contract, and the runtime needs to know only one. The language models
differ in a few ways (q/k/v bias, q/k norms, Gemma's norms, sliding windows, OPT's shape);
each is a ``DecoderSpec`` field set here from the HF config, so a text model is one entry
of ``TEXT_MODELS``: how its config maps to the spec and how its parameter names map to ours.
Tensors are shared, not copied (a 7B checkpoint is not held twice), except Gemma's norm
weights, which are stored as ``w`` and used as ``1 + w``: the fold writes ``1 + w`` once.

What we accept is what ``Decoder`` computes exactly; RoPE must be a fixed table of inverse
frequencies (rope types ``default``, ``linear``, ``llama3``; the table is taken from the HF
module itself). Anything else is refused with ``UnsupportedArchitecture`` from the config,
before the weights are read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from edgevl.errors import ExportError, UnsupportedArchitecture
from edgevl.exporters.families.base import EmbedPart
from edgevl.models.decoder import Decoder, DecoderSpec, RotaryEmbedding, mrope_axis

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")   # a static inv_freq table, no attention scaling
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "relu": "relu"}
LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


@dataclass(frozen=True)
class TextModel:
    """How one HF ``model_type`` becomes a ``DecoderSpec`` and edgevl parameter names."""
    fields: Callable[[object], dict]                       # config -> DecoderSpec variant fields
    renames: dict[str, str] = field(default_factory=dict)  # HF name segment -> ours
    one_plus_norms: bool = False                           # norms stored as w, used as (1 + w): Gemma
    refuse: Callable[[object], list[str]] = lambda c: []   # config -> what is not supported


def _act(c) -> str:
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None) or "silu"
    return ACTIVATIONS.get(act, act)


def _layer_types(c) -> tuple[str, ...]:
    types = getattr(c, "layer_types", None) or ()
    if not types or set(types) == {"full_attention"}:
        return ()
    return tuple(LAYER_TYPES.get(t, t) for t in types)


def _window(c) -> dict:
    types = _layer_types(c)
    return {"layer_types": types, "sliding_window": c.sliding_window} if types else {}


def _mrope_section(c) -> tuple[int, ...]:
    return tuple(int(n) for n in _rope(c).get("mrope_section") or (16, 24, 24))   # HF's default


def _gemma3_refuse(c) -> list[str]:
    out = [f"{k}={getattr(c, k)}" for k in ("final_logit_softcapping", "attn_logit_softcapping")
           if getattr(c, k, None) is not None]
    if getattr(c, "use_bidirectional_attention", False):
        out.append("use_bidirectional_attention=True (an encoder-style text model)")
    return out


def _opt_refuse(c) -> list[str]:
    out = []
    if not c.do_layer_norm_before:
        out.append("do_layer_norm_before=False (post-norm OPT, e.g. opt-350m)")
    if c.word_embed_proj_dim != c.hidden_size:
        out.append(f"word_embed_proj_dim={c.word_embed_proj_dim} != hidden_size (project_in/out)")
    if not getattr(c, "layer_norm_elementwise_affine", True):
        out.append("layer_norm_elementwise_affine=False")
    if getattr(c, "_remove_final_layer_norm", False):
        out.append("_remove_final_layer_norm=True")
    return out


TEXT_MODELS: dict[str, TextModel] = {
    "llama": TextModel(lambda c: {}),
    "qwen2": TextModel(lambda c: {"qkv_bias": True, **_window(c)}),
    "qwen3": TextModel(lambda c: {"qk_norm": True, **_window(c)}),
    "gemma": TextModel(lambda c: {"activation": _act(c)}, one_plus_norms=True),
    "gemma3_text": TextModel(
        lambda c: {"qk_norm": True, "sandwich_norms": True, "activation": _act(c),
                   "attn_scale": float(c.query_pre_attn_scalar) ** -0.5, **_window(c),
                   "rope_local_theta": float(_rope(c, "sliding_attention").get("rope_theta", 10000.0))},
        renames={"post_attention_layernorm": "post_attn_norm", "pre_feedforward_layernorm": "post_attention_layernorm",
                 "post_feedforward_layernorm": "post_mlp_norm"},
        one_plus_norms=True, refuse=_gemma3_refuse),
    "opt": TextModel(
        lambda c: {"norm": "layer", "mlp": "plain", "activation": ACTIVATIONS.get(c.activation_function,
                                                                                c.activation_function),
                   "attention_bias": bool(c.enable_bias), "mlp_bias": bool(c.enable_bias),
                   "learned_positions": c.max_position_embeddings + 2, "position_offset": 2},
        renames={"out_proj": "o_proj", "self_attn_layer_norm": "input_layernorm", "fc1": "mlp.up_proj",
                 "fc2": "mlp.down_proj", "final_layer_norm": "post_attention_layernorm"},
        refuse=_opt_refuse),
    # Qwen2-VL / Qwen2.5-VL: Qwen2 with multimodal RoPE (positions from the runtime, runtimes/mrope.py)
    "qwen2_vl_text": TextModel(lambda c: {"qkv_bias": True, "mrope_section": _mrope_section(c), **_window(c)}),
    "qwen2_5_vl_text": TextModel(lambda c: {"qkv_bias": True, "mrope_section": _mrope_section(c), **_window(c)}),
}


def _rope(text_config, layer_type: str | None = None) -> dict:
    """transformers 5 standardises RoPE settings into ``rope_parameters`` (per layer type for
    Gemma 3); older configs use ``rope_theta`` / ``rope_scaling``."""
    params = getattr(text_config, "rope_parameters", None)
    if params:
        params = dict(params)
        if "full_attention" in params or "sliding_attention" in params:
            params = dict(params.get(layer_type or "full_attention") or {})
        return params
    scaling = dict(getattr(text_config, "rope_scaling", None) or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return {**scaling, "rope_type": rope_type, "rope_theta": getattr(text_config, "rope_theta", 10000.0)}


rope_parameters = _rope


def text_model_kind(text_config, where: str) -> TextModel:
    model_type = getattr(text_config, "model_type", None)
    if model_type not in TEXT_MODELS:
        raise UnsupportedArchitecture(
            f"{where}: the language model is {model_type!r}; edgevl exports the text models "
            f"{', '.join(TEXT_MODELS)} (Llama-style and the decoder variants of edgevl.models.decoder) only")
    return TEXT_MODELS[model_type]


def decoder_spec(text_config, tied: bool, where: str = "text model") -> DecoderSpec:
    """The ``DecoderSpec`` of an HF text config, validated: refuses what ``Decoder`` cannot
    compute, naming it (called before the weights are loaded)."""
    c = text_config
    kind = text_model_kind(c, where)
    problems = kind.refuse(c)
    act = _act(c) if c.model_type != "opt" else ACTIVATIONS.get(c.activation_function, c.activation_function)
    if act not in ("silu", "gelu_tanh", "relu"):
        problems.append(f"activation {act!r} (supported: silu, gelu_tanh, relu)")
    layer_types = [lt for lt in ("full_attention", "sliding_attention")
                   if lt in (getattr(c, "layer_types", None) or ["full_attention"])]
    for lt in layer_types or [None]:
        rope = _rope(c, lt)
        if c.model_type != "opt" and rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
            problems.append(f"RoPE type {rope.get('rope_type')!r} (it changes with sequence length or scales "
                            f"attention; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if getattr(c, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp={c.pretraining_tp} (use a checkpoint with pretraining_tp=1)")
    if problems:
        raise UnsupportedArchitecture(f"{where}: the {c.model_type} language model has settings edgevl's decoder "
                                      "does not compute: " + "; ".join(dict.fromkeys(problems)))
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    eps = getattr(c, "rms_norm_eps", None) or 1e-5
    base = dict(hidden_dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=heads,
                n_kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
                mlp_dim=getattr(c, "intermediate_size", None) or c.ffn_dim, vocab_size=c.vocab_size,
                rope_theta=float(_rope(c).get("rope_theta", 10000.0)), rms_eps=eps,
                attention_bias=bool(getattr(c, "attention_bias", False)),
                mlp_bias=bool(getattr(c, "mlp_bias", False)), tie_embeddings=tied)
    base.update(kind.fields(c))
    try:
        return DecoderSpec(**base).validate()
    except UnsupportedArchitecture as e:
        raise UnsupportedArchitecture(f"{where}: {e}") from e


def check_text_config(text_config, where: str) -> DecoderSpec:
    """Refuse text models ``Decoder`` cannot reproduce exactly, naming what is supported."""
    return decoder_spec(text_config, tied=True, where=where)


def _set_parameter(root: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    *path, leaf = name.split(".")
    module = root
    for part in path:
        module = getattr(module, part, None)
        if module is None:
            raise ExportError(f"HF parameter {name!r} has no counterpart in edgevl's Decoder")
    current = module._parameters.get(leaf)
    if current is None:
        raise ExportError(f"HF parameter {name!r} has no counterpart in edgevl's Decoder")
    if tuple(current.shape) != tuple(param.shape):
        raise ExportError(f"HF parameter {name!r} has shape {tuple(param.shape)}, edgevl's Decoder expects "
                          f"{tuple(current.shape)}")
    module._parameters[leaf] = param


def _our_name(name: str, renames: dict[str, str]) -> str:
    if name.startswith("final_layer_norm."):   # OPT's last norm (its per-layer namesake is the pre-MLP norm)
        return "norm." + name.split(".", 1)[1]
    return ".".join(renames.get(seg, seg) for seg in name.split("."))


def _rotary_table(hf_rotary, layer_type: str | None, where: str) -> torch.Tensor:
    inv = getattr(hf_rotary, "inv_freq", None) if layer_type is None else None
    scaling = getattr(hf_rotary, "attention_scaling", 1.0)
    if inv is None:
        layer_type = layer_type or "full_attention"
        inv = getattr(hf_rotary, f"{layer_type}_inv_freq")
        scaling = getattr(hf_rotary, f"{layer_type}_attention_scaling", 1.0)
    if float(scaling) != 1.0:
        raise UnsupportedArchitecture(f"{where}: RoPE attention scaling {scaling} is not supported; supported rope "
                                      f"types: {', '.join(SUPPORTED_ROPE_TYPES)}")
    return inv.detach().float().clone()


def text_to_decoder(text_model: torch.nn.Module, lm_head: torch.nn.Linear, text_config, where: str,
                    variants: dict | None = None) -> Decoder:
    """An HF text model (``LlamaModel``, ``Qwen2Model``, ``Gemma3TextModel``, ``OPTDecoder``...)
    + its LM head as an edgevl ``Decoder`` sharing the same tensors. ``variants``: decoder
    fields the VLM sets rather than its text config (Gemma 3's image_bidirectional)."""
    kind = text_model_kind(text_config, where)
    tied = lm_head.weight is text_model.embed_tokens.weight or (
        lm_head.weight.data_ptr() == text_model.embed_tokens.weight.data_ptr())
    if getattr(lm_head, "bias", None) is not None:
        raise UnsupportedArchitecture(f"{where}: an LM head with a bias is not supported")
    spec = decoder_spec(text_config, tied, where)
    if variants:
        spec = dataclasses.replace(spec, **variants).validate()
    with torch.device("meta"):
        decoder = Decoder(spec)
    for name, param in text_model.named_parameters():
        module = text_model.get_submodule(name.rsplit(".", 1)[0])
        if kind.one_plus_norms and type(module).__name__.endswith("RMSNorm"):
            param = torch.nn.Parameter(1.0 + param.detach().float(), requires_grad=False)
        _set_parameter(decoder, _our_name(name, kind.renames), param)
    if not tied:
        _set_parameter(decoder, "lm_head.weight", lm_head.weight)
    else:
        decoder.lm_head.weight = decoder.embed_tokens.weight
    hf_rotary = getattr(text_model, "rotary_emb", None)
    if hf_rotary is not None:   # the tables come from the HF module, so linear/llama3 scaling is the HF one
        local = spec.rope_local_theta is not None
        decoder.rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta)
        decoder.rotary.inv_freq = _rotary_table(hf_rotary, "full_attention" if local else None, where)
        if local:
            decoder.rotary_local = RotaryEmbedding(spec.head_dim, spec.rope_local_theta)
            decoder.rotary_local.inv_freq = _rotary_table(hf_rotary, "sliding_attention", where)
    if spec.mrope_section:
        decoder.mrope_axis = mrope_axis(spec.mrope_section)
    if hf_rotary is None and not spec.learned_positions:
        raise ExportError(f"{where}: the HF text model has no rotary embedding module (rotary_emb)")
    left = [n for n, p in decoder.named_parameters() if p.is_meta] + \
           [n for n, b in decoder.named_buffers() if b.is_meta]
    if left:
        raise ExportError(f"{where}: the HF text model has no weights for {', '.join(left[:5])}"
                          f"{' ...' if len(left) > 5 else ''}; is it a {text_config.model_type} model?")
    return decoder.eval()


def embed_part(text_model: torch.nn.Module) -> EmbedPart:
    """The token embedding as the embed part. Gemma's embedding module scales by sqrt(hidden)
    in its own forward (image embeddings are merged after it, unscaled, as HF does), so the
    part runs the HF module as is; export records the scale (``embed_scale``) in the manifest."""
    return EmbedPart(text_model.embed_tokens)
