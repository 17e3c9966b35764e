"""A SmolVLM-256M-shaped checkpoint with random weights, built locally (no hub), for speed.

The shapes are those of HuggingFaceTB/SmolVLM-256M-Instruct (Idefics3ForConditionalGeneration):

- vision: SigLIP-style, 512 px, patch 16, hidden 768, 12 layers, 12 heads, MLP 3072 (~86 M);
- connector: pixel shuffle by 4, then one linear layer: 64 image tokens per 512 px image;
- text: SmolLM2-135M: Llama, hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536,
  vocab 49280, tied embeddings, rope theta 100000, context 8192.

The tokenizer is a small byte-level BPE with SmolVLM's special tokens (ids fit the 49280 vocab,
whose full size is kept because the output head is a fifth of the decoder's weights, which is
what decode speed depends on). The processor keeps the checkpoint's own settings
(``do_image_splitting=True``, longest edge 2048); edgevl's SmolVLM family and the PyTorch row
of the benchmark both encode the processor's unsplit global view (see
exporters/families/smolvlm.py for why), so all rows do the same work.

``smolvlm_256m_shaped_checkpoint(root)`` builds it once under ``root`` and returns its path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

BUILD_VERSION = 1          # bump when anything below changes, so cached checkpoints are rebuilt
NAME = "smolvlm-256m-shaped"

CHAT_TEMPLATE = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
                 "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
                 "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
                 "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
_CORPUS = ["describe the image.", "what color is the circle?", "how many shapes are there?",
           "where is the blue triangle? top left, bottom right.", "User: Assistant:",
           "a red square, a green circle and a yellow triangle on a noisy background."]

VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=512, patch_size=16)
TEXT = dict(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<pad>", "<end_of_utterance>", "<fake_token_around_image>",
                "<global-img>", "<image>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   unk_token=None, pad_token="<pad>", fake_image_token="<fake_token_around_image>",
                                   image_token="<image>", end_of_utterance_token="<end_of_utterance>",
                                   global_image_token="<global-img>")


def build(out: Path) -> Path:
    import torch
    import transformers as tf

    tok = _tokenizer()
    ids = tok.convert_tokens_to_ids
    text = tf.LlamaConfig(**TEXT, bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<end_of_utterance>"),
                          pad_token_id=ids("<pad>"))
    config = tf.Idefics3Config(vision_config=tf.Idefics3VisionConfig(**VISION), text_config=text,
                               image_token_id=ids("<image>"), scale_factor=4, tie_word_embeddings=True)
    torch.manual_seed(256)
    model = tf.Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids("<end_of_utterance>")
    model.generation_config.pad_token_id = ids("<pad>")
    # the Pillow processor: the default one wants torchvision (MEASURED.md item 11); both save as
    # "Idefics3ImageProcessor", so older transformers (the peers venv) read it too
    image_processor = tf.Idefics3ImageProcessorPil(size={"longest_edge": 4 * 512}, max_image_size={"longest_edge": 512},
                                                do_image_splitting=True)
    processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=64,
                                     chat_template=CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def smolvlm_256m_shaped_checkpoint(root: str | Path) -> Path:
    """The checkpoint directory under ``root``, built on first use (atomically), then reused."""
    out = Path(root) / f"{NAME}-v{BUILD_VERSION}"
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
