"""A Hugging Face Llama language model -> edgevl's ``Decoder``, sharing the weights.

Every HF family (LLaVA, SmolVLM/Idefics3, DeepSeek-VL) ends in a Llama-style decoder. Rather
than exporting each family's own attention code (dynamic caches, mask helpers, SDPA variants),
its weights are put into ``edgevl.models.decoder.Decoder``: every bundle then has the same
decoder graph and the same fixed-capacity KV-cache contract, and the runtime needs to know
only one. HF Llama and edgevl use the same parameter names, so the mapping is by name; the
tensors are shared, not copied, so a 7B checkpoint is not held twice.

What we accept is what ``Decoder`` computes exactly: RMSNorm, SiLU-gated MLP, grouped-query
attention, rotary embeddings whose effect is a fixed table of inverse frequencies (rope types
``default``, ``linear`` and ``llama3``; the table is taken from the HF module itself). Anything
else is refused with ``UnsupportedArchitecture`` before the weights are read.
"""

from __future__ import annotations

import torch

from edgevl.errors import ExportError, UnsupportedArchitecture
from edgevl.models.decoder import Decoder, DecoderSpec, RotaryEmbedding

SUPPORTED_TEXT_MODELS = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")   # a static inv_freq table, no attention scaling
SUPPORTED_ACTIVATIONS = ("silu",)


def rope_parameters(text_config) -> dict:
    """transformers 5 standardises RoPE settings into ``rope_parameters``; older configs use
    ``rope_theta`` / ``rope_scaling``."""
    params = getattr(text_config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = dict(getattr(text_config, "rope_scaling", None) or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return {**scaling, "rope_type": rope_type, "rope_theta": getattr(text_config, "rope_theta", 10000.0)}


def check_text_config(text_config, where: str) -> None:
    """Refuse text models ``Decoder`` cannot reproduce exactly, naming what is supported."""
    model_type = getattr(text_config, "model_type", None)
    if model_type not in SUPPORTED_TEXT_MODELS:
        raise UnsupportedArchitecture(
            f"{where}: the language model is {model_type!r}; edgevl exports Llama-style text models "
            f"(model_type {', '.join(SUPPORTED_TEXT_MODELS)}) only")
    act = getattr(text_config, "hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedArchitecture(f"{where}: text model activation {act!r} is not supported; supported: "
                                      + ", ".join(SUPPORTED_ACTIVATIONS))
    rope = rope_parameters(text_config)
    if rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitecture(
            f"{where}: RoPE type {rope.get('rope_type')!r} is not supported (it changes with sequence length or "
            f"scales attention); supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if getattr(text_config, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedArchitecture(f"{where}: pretraining_tp={text_config.pretraining_tp} is not supported; "
                                      "use a checkpoint with pretraining_tp=1")


def decoder_spec(text_config, tied: bool) -> DecoderSpec:
    c = text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return DecoderSpec(hidden_dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                       n_kv_heads=c.num_key_value_heads or c.num_attention_heads, head_dim=head_dim,
                       mlp_dim=c.intermediate_size, vocab_size=c.vocab_size,
                       rope_theta=float(rope_parameters(c).get("rope_theta", 10000.0)), rms_eps=c.rms_norm_eps,
                       attention_bias=bool(getattr(c, "attention_bias", False)),
                       mlp_bias=bool(getattr(c, "mlp_bias", False)), tie_embeddings=tied)


def _set_parameter(root: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    *path, leaf = name.split(".")
    module = root
    for part in path:
        module = getattr(module, part)
    current = module._parameters.get(leaf)
    if current is None:
        raise ExportError(f"HF parameter {name!r} has no counterpart in edgevl's Decoder")
    if tuple(current.shape) != tuple(param.shape):
        raise ExportError(f"HF parameter {name!r} has shape {tuple(param.shape)}, edgevl's Decoder expects "
                          f"{tuple(current.shape)}")
    module._parameters[leaf] = param


def llama_to_decoder(text_model: torch.nn.Module, lm_head: torch.nn.Linear, text_config, where: str) -> Decoder:
    """An HF ``LlamaModel`` (+ its LM head) as an edgevl ``Decoder`` sharing the same tensors."""
    check_text_config(text_config, where)
    tied = lm_head.weight is text_model.embed_tokens.weight or (
        lm_head.weight.data_ptr() == text_model.embed_tokens.weight.data_ptr())
    spec = decoder_spec(text_config, tied)
    with torch.device("meta"):
        decoder = Decoder(spec)
    for name, param in text_model.named_parameters():
        _set_parameter(decoder, name, param)
    if not tied:
        _set_parameter(decoder, "lm_head.weight", lm_head.weight)
    else:
        decoder.lm_head.weight = decoder.embed_tokens.weight
    # The inverse-frequency table comes from the HF module, so linear/llama3 scaling is the HF one.
    hf_rotary = text_model.rotary_emb
    if float(getattr(hf_rotary, "attention_scaling", 1.0)) != 1.0:
        raise UnsupportedArchitecture(f"{where}: RoPE attention scaling {hf_rotary.attention_scaling} is not "
                                      f"supported; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}")
    decoder.rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta)
    decoder.rotary.inv_freq = hf_rotary.inv_freq.detach().float().clone()
    left = [n for n, p in decoder.named_parameters() if p.is_meta] + \
           [n for n, b in decoder.named_buffers() if b.is_meta]
    if left:
        raise ExportError(f"{where}: the HF text model has no weights for {', '.join(left[:5])}"
                          f"{' ...' if len(left) > 5 else ''}; is it a Llama-style model?")
    return decoder.eval()
