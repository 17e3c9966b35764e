"""What the random-weight "shaped" checkpoints share (smolvlm_shaped.py, llava_shaped.py).

- ``SMOLLM2_135M``: the decoder both use, SmolLM2-135M's shape (Llama, hidden 576, 30 layers,
  9 heads / 3 KV heads, MLP 1536, vocab 49280, tied embeddings, rope theta 100000, context 8192);
- ``bpe_tokenizer``: a small byte-level BPE trained here (no hub) with the given special tokens,
  wrapped in ``PreTrainedTokenizerFast``; its ids fit the 49280 vocab, whose full size is kept
  because the output head is a fifth of the decoder's weights, which is what decode speed
  depends on;
- ``smollm2_text_config`` / ``finish``: that decoder's config and generation settings with the
  tokenizer's BOS/EOS/pad ids;
- ``cached_checkpoint``: build a checkpoint once under a cache root, atomically, keyed by its
  name and build version, then reuse it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

SMOLLM2_135M = dict(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)
BOS, EOS, PAD = "<|im_start|>", "<end_of_utterance>", "<pad>"

_CORPUS = ["describe the image.", "what color is the circle?", "how many shapes are there?",
           "where is the blue triangle? top left, bottom right.", "User: Assistant:",
           "a red square, a green circle and a yellow triangle on a noisy background."]


def bpe_tokenizer(specials: list[str], **named):
    """A byte-level BPE of 400 tokens with ``specials`` first (BOS/EOS/pad as above)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=None,
                                   pad_token=PAD, **named)


def smollm2_text_config(tok, **overrides):
    """SmolLM2-135M's LlamaConfig (``overrides`` change fields, e.g. a tiny size for a test)."""
    from transformers import LlamaConfig

    ids = tok.convert_tokens_to_ids
    return LlamaConfig(**{**SMOLLM2_135M, **overrides}, bos_token_id=ids(BOS), eos_token_id=ids(EOS),
                       pad_token_id=ids(PAD))


def finish(model, tok):
    """The model in eval mode, generating until the tokenizer's EOS, padding with its pad token."""
    model.eval()
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(EOS)
    model.generation_config.pad_token_id = tok.convert_tokens_to_ids(PAD)
    return model


def cached_checkpoint(root: str | Path, name: str, version: int, build: Callable[[Path], object]) -> Path:
    """``root/name-vVERSION``, built by ``build(directory)`` on first use (atomically), then reused."""
    out = Path(root) / f"{name}-v{version}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def parity_facts(parity: dict) -> dict:
    """The export's parity report in a shaped result: worst max abs diff per part, greedy matches."""
    greedy = parity.get("greedy", [])
    return {"parity_max_abs": {p["part"]: max(o["max_abs"] for o in p["outputs"]) for p in parity.get("parts", [])},
            "greedy_identical": f"{sum(g['match'] for g in greedy)}/{len(greedy)}"}


def emit(result: dict, json_out: Path | None) -> dict:
    """Print a shaped benchmark's result as JSON and write it atomically to ``json_out``, if given."""
    import json

    from edgevl.benchmarks.batching import atomic_write

    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        atomic_write(Path(json_out), text + "\n")
    return result
