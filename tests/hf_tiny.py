"""Tiny random-weight Hugging Face VLM checkpoints, built locally (no hub), for the family tests.

Each builder writes a directory in the ``save_pretrained`` layout a real checkpoint has: model
weights and config, a small byte-level BPE tokenizer (HF ``tokenizers``) wrapped in
``PreTrainedTokenizerFast`` with the family's special tokens and chat template, the family's
image processor and its processor. Models are a few hundred thousand parameters so export and
all checks take seconds. Weights are drawn with a larger init range than the default so logits
are peaked: greedy tokens then do not hinge on float noise between PyTorch and ONNX.

``build(family, root)`` builds one and caches it under ``root`` (tests pass a session tmp dir).
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("llava", "smolvlm", "idefics3", "deepseek_vl", "internvl", "blip2", "qwen2_vl", "qwen2_5_vl", "gemma3")

_CORPUS = [
    "describe the image in one sentence.", "what color is the circle?", "how many shapes are there?",
    "is there a red square on the left?", "the quick brown fox jumps over the lazy dog.",
    "a photo of a cat sitting on a table next to a window.", "USER: ASSISTANT: User: Assistant:",
    "You are a helpful language and vision assistant.", "where is the blue triangle? top left, bottom right.",
    "count the objects: one two three four five six seven eight nine ten.",
]

LLAVA_CHAT = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}"
              "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
              "{% endfor %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}"
              "{% endif %}{% endfor %}"
              "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
SMOLVLM_CHAT = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
                "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
                "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
                "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
DEEPSEEK_CHAT = ("{{ 'You are a helpful language and vision assistant.\n\n' }}{% for message in messages %}"
                 "{{ message['role'] | capitalize + ': ' }}{% for c in message['content'] %}"
                 "{% if c['type'] == 'image' %}{{ '<image_placeholder>' }}{% elif c['type'] == 'text' %}"
                 "{{ c['text'] }}{% endif %}{% endfor %}{{ '\n\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def make_tokenizer(specials: list[str], bos: str | None, eos: str, add_bos: bool, **named):
    """A byte-level BPE (a few hundred tokens) with ``specials`` as added special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if add_bos and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=None,
                                   pad_token="<pad>", **named)


def _llama(vocab: int, bos: int | None, eos: int, pad: int, **kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.5,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def _finish(model, out: Path, eos: int) -> None:
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = model.config.get_text_config().pad_token_id
    model.save_pretrained(out)


def build_llava(out: Path) -> Path:
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, \
        LlavaProcessor

    tok = make_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>", add_bos=True)
    ids = tok.convert_tokens_to_ids
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32, initializer_range=0.5)
    text = _llama(len(tok), ids("<s>"), ids("</s>"), ids("<pad>"))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # vision_feature_select_strategy="default" drops CLS, so the processor must count it (MEASURED.md item 12)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT)
    _finish(model, out, ids("</s>"))
    processor.save_pretrained(out)
    return out


def _smol_tokenizer():
    specials = ["<|endoftext|>", "<|im_start|>", "<pad>", "<end_of_utterance>", "<fake_token_around_image>",
                "<global-img>", "<image>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    return make_tokenizer(specials, bos="<|im_start|>", eos="<end_of_utterance>", add_bos=False,
                          fake_image_token="<fake_token_around_image>", image_token="<image>",
                          end_of_utterance_token="<end_of_utterance>", global_image_token="<global-img>")


def build_smolvlm(out: Path, idefics3: bool = False) -> Path:
    import torch
    import transformers as tf

    tok = _smol_tokenizer()
    ids = tok.convert_tokens_to_ids
    text = _llama(len(tok), ids("<|im_start|>"), ids("<end_of_utterance>"), ids("<pad>"), tie_word_embeddings=True)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=4, initializer_range=0.5)
    torch.manual_seed(1)
    if idefics3:
        config = tf.Idefics3Config(vision_config=tf.Idefics3VisionConfig(**vision), text_config=text,
                                   image_token_id=ids("<image>"), scale_factor=2, tie_word_embeddings=True)
        model = tf.Idefics3ForConditionalGeneration(config).eval()
        image_processor = tf.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                       do_image_splitting=True)
        processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=16,
                                         chat_template=SMOLVLM_CHAT)
    else:
        config = tf.SmolVLMConfig(vision_config=tf.SmolVLMVisionConfig(**vision), text_config=text,
                                  image_token_id=ids("<image>"), scale_factor=2, tie_word_embeddings=True)
        model = tf.SmolVLMForConditionalGeneration(config).eval()
        image_processor = tf.SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                      do_image_splitting=True)
        processor = None
    _finish(model, out, ids("<end_of_utterance>"))
    if processor is not None:
        processor.save_pretrained(out)
    else:
        # SmolVLMProcessor cannot be built without torchvision (its video processor needs it, MEASURED.md
        # item 11), so write its files the way the SmolVLM checkpoints on the hub ship them.
        image_processor.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "processor_config.json").write_text(json.dumps({"image_seq_len": 16,
                                                               "processor_class": "SmolVLMProcessor"}))
        (out / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_CHAT}))
    return out


def build_deepseek_vl(out: Path) -> Path:
    import torch
    import transformers as tf

    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tok = make_tokenizer(["<unk>", bos, eos, "<pad>", "<image_placeholder>"], bos=bos, eos=eos, add_bos=True,
                         image_token="<image_placeholder>")
    ids = tok.convert_tokens_to_ids
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8, vision_use_head=False)
    text = _llama(len(tok), ids(bos), ids(eos), ids("<pad>"), tie_word_embeddings=True)
    config = tf.DeepseekVLConfig(vision_config=vision, text_config=text, image_token_id=ids("<image_placeholder>"))
    torch.manual_seed(2)
    model = tf.DeepseekVLForConditionalGeneration(config).eval()
    _scale_init(model, gain=2.0)
    image_processor = tf.DeepseekVLImageProcessorPil(size={"height": 32, "width": 32}, min_size=4)
    processor = tf.DeepseekVLProcessor(image_processor=image_processor, tokenizer=tok, num_image_tokens=16,
                                       chat_template=DEEPSEEK_CHAT)
    _finish(model, out, ids(eos))
    processor.save_pretrained(out)
    return out


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
          "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
          "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_internvl(out: Path) -> Path:
    """InternVL (InternViT, pixel shuffle, MLP projector, Qwen2 decoder with q/k/v bias). Its
    processor needs a video processor (torchvision), so its files are written the way the
    InternVL-hf checkpoints ship them, as for SmolVLM."""
    import torch
    import transformers as tf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok = make_tokenizer(specials, bos=None, eos="<|im_end|>", add_bos=False, start_image_token="<img>",
                         end_image_token="</img>", context_image_token="<IMG_CONTEXT>", video_token="<video>")
    ids = tok.convert_tokens_to_ids
    vision = tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=[32, 32], patch_size=[4, 4], initializer_range=0.5)
    # head_dim 16: ONNX Runtime's GroupQueryAttention rotates only heads of a multiple of 16, and this
    # decoder is also the one the lowering test runs (q/k/v bias)
    text = tf.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          initializer_range=0.5, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                          pad_token_id=ids("<pad>"), tie_word_embeddings=False)
    config = tf.InternVLConfig(vision_config=vision, text_config=text, image_token_id=ids("<IMG_CONTEXT>"),
                               image_seq_length=16, downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(4)
    model = tf.InternVLForConditionalGeneration(config).eval()
    _scale_init(model, gain=2.0)
    _finish(model, out, ids("<|im_end|>"))
    tf.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": 16,
                                                           "processor_class": "InternVLProcessor"}))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHATML}))
    return out


def build_blip2(out: Path) -> Path:
    """BLIP-2 with an OPT decoder (LayerNorm, ReLU MLP, learned positions); the processor puts
    the image block before BOS, and OPT's BOS is ``</s>``."""
    import torch
    import transformers as tf

    tok = make_tokenizer(["<pad>", "</s>", "<unk>", "<image>"], bos="</s>", eos="</s>", add_bos=True)
    ids = tok.convert_tokens_to_ids
    vision = tf.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    qformer = tf.Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    encoder_hidden_size=32, vocab_size=64, max_position_embeddings=32)
    text = tf.OPTConfig(vocab_size=len(tok), hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=48, init_std=0.5, bos_token_id=ids("</s>"),
                        eos_token_id=ids("</s>"), pad_token_id=ids("<pad>"))
    config = tf.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=8,
                            image_token_index=ids("<image>"))
    torch.manual_seed(5)
    model = tf.Blip2ForConditionalGeneration(config).eval()
    _scale_init(model, gain=2.0)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 1.0)
    processor = tf.Blip2Processor(image_processor=tf.BlipImageProcessorPil(size={"height": 32, "width": 32}),
                                  tokenizer=tok, num_query_tokens=8)
    _finish(model, out, ids("</s>"))
    processor.save_pretrained(out)
    return out


GEMMA_CHAT = ("{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' "
              "else message['role']) + '\n' }}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
              "{{ '<start_of_image>' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
              "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def build_gemma3(out: Path, pan_and_scan: bool = False) -> Path:
    """Gemma 3: SigLIP, the pooling projector (64 patches -> 16 image tokens), a Gemma 3 decoder
    with sliding layers (window 8, shorter than the image block) beside a global one."""
    import torch
    import transformers as tf

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    tok = make_tokenizer(specials, bos="<bos>", eos="<eos>", add_bos=True, boi_token="<start_of_image>",
                         eoi_token="<end_of_image>", image_token="<image_soft_token>")
    ids = tok.convert_tokens_to_ids
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=4, vision_use_head=False)
    text = tf.Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                               sliding_window=8, max_position_embeddings=512, initializer_range=0.5,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               bos_token_id=ids("<bos>"), eos_token_id=ids("<end_of_turn>"), pad_token_id=ids("<pad>"),
                               tie_word_embeddings=False)
    # untied: with Gemma's sqrt(hidden) embedding scale, a tiny tied model predicts its last token again and again
    config = tf.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16,
                             boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                             image_token_index=ids("<image_soft_token>"), tie_word_embeddings=False)
    torch.manual_seed(6)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    _scale_init(model.model.vision_tower, gain=2.0)
    _scale_init(model.model.language_model, gain=1.0)
    _scale_init(model.lm_head, gain=2.0)
    with torch.no_grad():
        projector = model.model.multi_modal_projector
        projector.mm_input_projection_weight.normal_(0.0, 2.0 / projector.mm_input_projection_weight.shape[0] ** 0.5)
        for name, p in model.named_parameters():       # random (1 + w) norms
            if "norm" in name and p.ndim == 1 and "vision" not in name:
                p.normal_(0.0, 0.3)
    image_processor = tf.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=pan_and_scan)
    processor = tf.Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=16,
                                   chat_template=GEMMA_CHAT)
    _finish(model, out, ids("<end_of_turn>"))
    processor.save_pretrained(out)
    return out


def _scale_init(model, gain: float) -> None:
    """Re-draw linear/conv/embedding weights as N(0, gain / sqrt(fan_in)): SigLIP's init ignores
    initializer_range, and its default leaves logits too flat for stable greedy tokens."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d)):
                module.weight.normal_(0.0, gain / module.weight.shape[-1] ** 0.5)


QWEN_CHAT = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
             "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
             "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif c['type'] == 'text' %}{{ c['text'] }}"
             "{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_qwen_vl(out: Path, v2_5: bool = True) -> Path:
    """Qwen2.5-VL (window attention: 2x2 merged tokens per window, blocks 1 and 3 global) or
    Qwen2-VL, with patch 4 / merge 2 so a 32x48 image is a 4x6 grid of 24 image tokens. The
    processor needs a video processor (torchvision), so its files are written as the hub's are."""
    import torch
    import transformers as tf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = make_tokenizer(specials, bos=None, eos="<|im_end|>", add_bos=False, image_token="<|image_pad|>",
                         video_token="<|video_pad|>", vision_bos_token="<|vision_start|>",
                         vision_eos_token="<|vision_end|>")
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.5, bos_token_id=None,
                eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<pad>"), tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=4, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=0.5)
    tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    if v2_5:
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16,
                      fullatt_block_indexes=[1, 3])
        config = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **tokens)
        model_cls, processor_name = tf.Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VLProcessor"
    else:
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=64)
        config = tf.Qwen2VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **tokens)
        model_cls, processor_name = tf.Qwen2VLForConditionalGeneration, "Qwen2VLProcessor"
    torch.manual_seed(6 if v2_5 else 7)
    model = model_cls(config).eval()
    _scale_init(model, gain=2.0)
    _finish(model, out, ids("<|im_end|>"))
    tf.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                max_pixels=64 * 64).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": processor_name}))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT}))
    return out


def build_not_a_vlm(out: Path) -> Path:
    """A plain Llama causal LM: a real HF checkpoint that is not a VLM (must be refused)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    LlamaForCausalLM(_llama(64, 1, 2, 0)).save_pretrained(out)
    return out


BUILDERS = {
    "llava": build_llava,
    "smolvlm": build_smolvlm,
    "idefics3": lambda out: build_smolvlm(out, idefics3=True),
    "deepseek_vl": build_deepseek_vl,
    "internvl": build_internvl,
    "blip2": build_blip2,
    "qwen2_5_vl": build_qwen_vl,
    "qwen2_vl": lambda out: build_qwen_vl(out, v2_5=False),
    "gemma3": build_gemma3,
    "llama": build_not_a_vlm,
}


def build(family: str, root: Path) -> Path:
    """The tiny checkpoint of ``family`` under ``root`` (built on first use, then reused)."""
    out = Path(root) / family
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    return BUILDERS[family](out)
