"""A SmolVLM-256M-shaped checkpoint with random weights, built locally (no hub), for speed.

The shapes are those of HuggingFaceTB/SmolVLM-256M-Instruct (Idefics3ForConditionalGeneration):

- vision: SigLIP-style, 512 px, patch 16, hidden 768, 12 layers, 12 heads, MLP 3072 (~86 M);
- connector: pixel shuffle by 4, then one linear layer: 64 image tokens per 512 px image;
- text: SmolLM2-135M: Llama, hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536,
  vocab 49280, tied embeddings, rope theta 100000, context 8192 (shaped.py, shared with
  llava_shaped.py).

The tokenizer is shaped.py's small byte-level BPE with SmolVLM's special tokens. The processor
keeps the checkpoint's own settings (``do_image_splitting=True``, longest edge 2048); edgevl's
SmolVLM family and the PyTorch row of the benchmark both encode the processor's unsplit global
view (see exporters/families/smolvlm.py for why), so all rows do the same work.

``smolvlm_256m_shaped_checkpoint(root)`` builds it once under ``root`` and returns its path.
"""

from __future__ import annotations

from pathlib import Path

from edgevl.benchmarks.shaped import SMOLLM2_135M, bpe_tokenizer, cached_checkpoint, finish, smollm2_text_config

BUILD_VERSION = 1          # bump when anything below changes, so cached checkpoints are rebuilt
NAME = "smolvlm-256m-shaped"

CHAT_TEMPLATE = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
                 "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
                 "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
                 "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=512, patch_size=16)
TEXT = SMOLLM2_135M


def _tokenizer():
    specials = ["<|endoftext|>", "<|im_start|>", "<pad>", "<end_of_utterance>", "<fake_token_around_image>",
                "<global-img>", "<image>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    return bpe_tokenizer(specials, fake_image_token="<fake_token_around_image>", image_token="<image>",
                         end_of_utterance_token="<end_of_utterance>", global_image_token="<global-img>")


def build(out: Path) -> Path:
    import torch
    import transformers as tf

    tok = _tokenizer()
    config = tf.Idefics3Config(vision_config=tf.Idefics3VisionConfig(**VISION), text_config=smollm2_text_config(tok),
                               image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=4,
                               tie_word_embeddings=True)
    torch.manual_seed(256)
    model = finish(tf.Idefics3ForConditionalGeneration(config), tok)
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
    return cached_checkpoint(root, NAME, BUILD_VERSION, build)
