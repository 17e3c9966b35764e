"""A LLaVA-shaped checkpoint with random weights, built locally (no hub), for speed.

``LlavaForConditionalGeneration`` with the shapes of LLaVA-1.5's vision side at 224 px and
smolvlm_shaped.py's decoder, so the two built-in shaped models differ in the vision side only:

- vision: CLIP ViT-B/16 at 224 px: hidden 768, 12 layers, 12 heads, MLP 3072, quick GELU
  (~86 M); features of the second-to-last layer (``vision_feature_layer=-2``) with the CLS token
  dropped (``vision_feature_select_strategy="default"``): 14 x 14 = 196 image tokens;
- projector: LLaVA's two linear layers with GELU between (768 -> 576 -> 576);
- text: SmolLM2-135M (shaped.py), the same config as smolvlm-256m-shaped's.

The tokenizer is shaped.py's byte-level BPE with an ``<image>`` token; the chat template is
LLaVA-1.5's ("USER: <image>\\n{prompt} ASSISTANT:"), written to accept a message's content as a
list of parts (transformers) or as a string (OpenVINO GenAI's VLMPipeline passes the prompt with
``<image>\\n`` already in it). The processor is transformers' standard CLIP image processor
(shortest edge 224, centre crop 224) and ``LlavaProcessor``, which counts the dropped CLS token
(``num_additional_image_tokens=1``, MEASURED.md item 12), so transformers, the peers and edgevl's
LLaVA family read the checkpoint as they read llava-hf's.

``llava_shaped_checkpoint(root)`` builds it once under ``root`` and returns its path;
``build(out, vision=..., text=...)`` takes field overrides, so a test builds a tiny one through
the same code.
"""

from __future__ import annotations

from pathlib import Path

from edgevl.benchmarks.shaped import bpe_tokenizer, cached_checkpoint, finish, smollm2_text_config

BUILD_VERSION = 1          # bump when anything below changes, so cached checkpoints are rebuilt
NAME = "llava-shaped"

VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=224, patch_size=16, projection_dim=512)
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}"
                 "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
                 "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
                 "{% endfor %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}"
                 "{% endif %}{% endfor %}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<pad>", "<end_of_utterance>", "<image>"]


def tokenizer():
    return bpe_tokenizer(SPECIALS)


def make_config(tok, vision: dict | None = None, text: dict | None = None):
    """The LlavaConfig; ``vision``/``text`` override fields of VISION and SmolLM2-135M's text config."""
    import transformers as tf

    vision_config = tf.CLIPVisionConfig(**{**VISION, **(vision or {})})
    grid = vision_config.image_size // vision_config.patch_size
    return tf.LlavaConfig(vision_config=vision_config, text_config=smollm2_text_config(tok, **(text or {})),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=grid * grid,
                          projector_hidden_act="gelu", vision_feature_layer=-2,
                          vision_feature_select_strategy="default", tie_word_embeddings=True)


def make_processor(tok, config):
    import transformers as tf

    size = config.vision_config.image_size
    # the Pillow processor: the default one wants torchvision (MEASURED.md item 11); both save as
    # "CLIPImageProcessor", so older transformers (the peers venv) read it too
    image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return tf.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=config.vision_config.patch_size,
                             vision_feature_select_strategy=config.vision_feature_select_strategy,
                             num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build(out: Path, vision: dict | None = None, text: dict | None = None, seed: int = 224) -> Path:
    import torch
    import transformers as tf

    tok = tokenizer()
    config = make_config(tok, vision, text)
    torch.manual_seed(seed)
    model = finish(tf.LlavaForConditionalGeneration(config), tok)
    model.save_pretrained(out)
    make_processor(tok, config).save_pretrained(out)
    return Path(out)


def llava_shaped_checkpoint(root: str | Path) -> Path:
    """The checkpoint directory under ``root``, built on first use (atomically), then reused."""
    return cached_checkpoint(root, NAME, BUILD_VERSION, build)
