"""What the Hugging Face family specs share: checkpoint checks, the HF reference, prompt and
preprocessing specs derived from the checkpoint's own processor.

The reference is the family's HF processor plus the HF model's own ``generate`` (greedy): the
bundle is checked against what a transformers user gets, not against our reading of it.
The prompt spec is *derived* from the processor (its chat template rendered with a sentinel,
the exact text it expands one image into) and then proved: the tokens the runtime will make
from the shipped tokenizer.json must equal the processor's ``input_ids``, or export stops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from edgevl.errors import CheckpointError, ExportError, UnsupportedArchitecture
from edgevl.exporters.families.base import ExportableVLM, FamilySpec, Reference
from edgevl.prompting import render_prompt

PROMPT_SLOT = "EDGEVLPROMPTSLOT"
SAMPLE_PROMPTS = ("describe the image.", "what color is the circle?", "how many shapes are there?")
# Pillow filter numbers (PIL.Image.Resampling) -> edgevl.preprocess interpolation names
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
# (what it is, any of these files) every save_pretrained checkpoint we export has
HF_FILES = (
    ("config", ("config.json",)),
    ("weights", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")),
    ("tokenizer", ("tokenizer.json",)),
    ("image processor config", ("preprocessor_config.json", "processor_config.json")),
)


class HFFamilySpec(FamilySpec):
    """A family exported from a transformers ``*ForConditionalGeneration`` checkpoint."""

    model_class: ClassVar[str]

    @classmethod
    def matches(cls, config: dict) -> bool:
        archs = config.get("architectures")
        if archs:   # a model_type shared by several heads (e.g. llava) must not pull in the others
            return bool(set(archs) & set(cls.architectures))
        return config.get("model_type") in cls.architectures

    @classmethod
    def check_files(cls, path: Path) -> None:
        missing = [f"{what} ({' or '.join(names)})" for what, names in HF_FILES
                   if not any((path / n).is_file() for n in names)]
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / index).is_file():
                shards = sorted(set(json.loads((path / index).read_text()).get("weight_map", {}).values()))
                missing += [f"weight shard {s}" for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: checkpoint directory is missing {', '.join(missing)}; a {cls.name} "
                                  "checkpoint saved with save_pretrained (model, tokenizer and processor) has them")

    def load_model(self, path: Path, config: dict):
        import transformers

        arch = next((a for a in config.get("architectures") or [] if a in self.architectures), self.model_class)
        cls = getattr(transformers, arch)
        try:
            model = cls.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: transformers could not load the {arch} checkpoint: {e}") from e
        return arch, model.eval()

    def open(self, path: Path, label: str):
        """-> (where, config, arch, model): the config checked (text model refused before any
        weight is read), then the model loaded in float32."""
        from transformers import AutoConfig

        from edgevl.exporters.families.base import read_config
        from edgevl.exporters.families.hf_text import check_text_config

        where = f"{path} ({label})"
        config = AutoConfig.from_pretrained(path)
        self.check_config(config, where)
        check_text_config(config.text_config, where)
        arch, model = self.load_model(path, read_config(path))
        return where, config, arch, model

    def check_config(self, config, where: str) -> None:
        """Family options refused before the weights load (a family overrides it)."""

    def assemble(self, path: Path, where: str, arch: str, model, config, ref: "HFReference", *,
                 vision: torch.nn.Module, text_model: torch.nn.Module, size: tuple[int, int], preprocess: dict,
                 hf_features, check_batch: int = 2, image_token_id: int | None = None,
                 lm_head: torch.nn.Module | None = None, manifest_extra: dict | None = None,
                 decoder_variants: dict | None = None) -> ExportableVLM:
        """What every HF family does once its own parts exist: the text model as edgevl's
        Decoder, the prompt spec derived and proved against the processor, the vision part
        checked against the HF model's image features, and the ExportableVLM."""
        from edgevl.exporters.families.hf_text import embed_part, text_to_decoder

        text = config.text_config
        decoder = text_to_decoder(text_model, model.lm_head if lm_head is None else lm_head, text, where,
                                  decoder_variants)
        token_id = config.image_token_id if image_token_id is None else image_token_id
        prompt, add_special, tokenizer_file = derive_prompt(ref, path, token_id, size, text.bos_token_id)
        check_vision(where, vision.eval(), hf_features, torch.randn(check_batch, 3, *size), prompt["image_seq_len"])
        vlm = ExportableVLM(
            name=path.name, family=self.name, architecture=arch, source=str(path),
            vision=vision, embed=embed_part(text_model), decoder=decoder,
            pixel_shape=(3, *size), image_seq_len=prompt["image_seq_len"], preprocess=preprocess,
            prompt=prompt, tokenizer_file=tokenizer_file,
            tokenizer={"bos_token_id": text.bos_token_id, "eos_token_ids": ref.eos,
                       "pad_token_id": text.pad_token_id, "add_special_tokens": add_special},
            max_position=int(text.max_position_embeddings), reference=ref,
            sample_prompts=SAMPLE_PROMPTS, extra_files=shipped_files(path), manifest_extra=dict(manifest_extra or {}))
        return vlm.eval()


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def shipped_files(path: Path) -> dict[str, Path]:
    """Processor/tokenizer/generation configs copied into the bundle under hf/ (provenance)."""
    names = ("config.json", "generation_config.json", "tokenizer_config.json", "preprocessor_config.json",
             "processor_config.json", "chat_template.jinja", "chat_template.json", "special_tokens_map.json")
    return {f"hf/{n}": path / n for n in names if (path / n).is_file()}


def image_only_processor(processor_cls, path: Path, *count_keys: str):
    """``processor_cls`` (SmolVLMProcessor, InternVLProcessor...) built without its video
    processor, which needs torchvision, and torchvision cannot sit beside torch 2.13 here
    (MEASURED.md item 11); images need none of it. ``count_keys``: the processor_config.json
    keys passed on (the image token count)."""
    import transformers as tf
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(processor_cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    config = read_json(path / "processor_config.json")
    template = (path / "chat_template.jinja").read_text() if (path / "chat_template.jinja").is_file() else \
        read_json(path / "chat_template.json").get("chat_template") or config.get("chat_template")
    kwargs = {k: config[k] for k in count_keys if k in config}
    return ImageOnlyProcessor(image_processor=tf.AutoImageProcessor.from_pretrained(path),
                              tokenizer=tf.AutoTokenizer.from_pretrained(path), video_processor=None,
                              chat_template=template, **kwargs)


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.get_text_config().eos_token_id
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


def interpolation(resample, where: str) -> str:
    value = int(getattr(resample, "value", resample))
    if value not in RESAMPLE:
        raise UnsupportedArchitecture(f"{where}: image processor resample={resample} is not supported; supported: "
                                      + ", ".join(f"{k} ({v})" for k, v in RESAMPLE.items()))
    return RESAMPLE[value]


def normalisation(ip) -> dict:
    """rescale / mean / std of an HF image processor, as edgevl.preprocess takes them."""
    return {"rescale": float(ip.rescale_factor) if ip.do_rescale else 1.0,
            "mean": [float(m) for m in ip.image_mean] if ip.do_normalize else [0.0, 0.0, 0.0],
            "std": [float(s) for s in ip.image_std] if ip.do_normalize else [1.0, 1.0, 1.0],
            "channel_order": "RGB"}


FEATURE_STRATEGIES = ("default", "full")   # CLS dropped / kept by LLaVA-style vision feature selection


def check_feature_strategy(config, where: str) -> None:
    strategy = config.vision_feature_select_strategy
    if strategy not in FEATURE_STRATEGIES:
        raise UnsupportedArchitecture(f"{where}: vision_feature_select_strategy {strategy!r} is not supported; "
                                      f"supported: {', '.join(FEATURE_STRATEGIES)}")


def stretch_spec(ip, where: str) -> tuple[dict, tuple[int, int]]:
    """An image processor that resizes to a fixed ``{'height': H, 'width': W}`` (no crop, no
    aspect kept) -> (preprocess spec, (H, W))."""
    size = dict(ip.size)
    if not ip.do_resize or not size.get("height") or not size.get("width"):
        raise UnsupportedArchitecture(f"{where}: image processor do_resize={ip.do_resize} size={size} is not "
                                      "supported; supported: do_resize with size={'height': H, 'width': W}")
    out = (int(size["height"]), int(size["width"]))
    return {"size": list(out), "resize_mode": "stretch", "interpolation": interpolation(ip.resample, where),
            **normalisation(ip)}, out


class HFReference(Reference):
    """The HF processor and model of a checkpoint, used exactly as a transformers user would."""

    def __init__(self, model, processor, eos: list[int], image_kwargs: dict | None = None,
                 default_template: str | None = None):
        self.model, self.processor, self.eos = model, processor, eos
        self.image_kwargs = dict(image_kwargs or {})
        self.default_template = default_template
        self.image_token = processor.image_token

    # -- text ----------------------------------------------------------------------------------
    def text(self, prompt: str, n_images: int = 1) -> str:
        """The prompt as the processor's chat template renders it (one user turn, generation prompt)."""
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        if not self.default_template:
            raise ExportError("the checkpoint has no chat template and the family has no default prompt template")
        return render_prompt(self.default_template, prompt, self.image_token, n_images)

    def blank_images(self, n: int, shape: tuple[int, int]) -> list[np.ndarray]:
        return [np.zeros((*shape, 3), np.uint8) for _ in range(n)]

    def image_block(self, size: tuple[int, int]) -> str:
        """The exact text the processor expands one image token into."""
        out = self.processor(text=self.image_token, images=self.blank_images(1, size),
                             return_text_replacement_offsets=True, **self.image_kwargs)
        offsets = out["text_replacement_offsets"][0]
        if len(offsets) != 1:
            raise ExportError(f"the processor expanded one image into {len(offsets)} pieces; expected one")
        return offsets[0]["replacement"]

    def prompt_layout(self) -> tuple[str, str]:
        """(template with {image} and {prompt}, the text the chat template puts after each image),
        found by rendering the chat template around a sentinel with one and two images."""
        tok = self.image_token
        one, two = self.text(PROMPT_SLOT, 1), self.text(PROMPT_SLOT, 2)
        if one.count(tok) != 1 or one.count(PROMPT_SLOT) != 1:
            raise ExportError(f"the chat template rendered {one!r}: expected one {tok!r} and one prompt slot")
        head, tail = one.split(tok)
        second = two.find(tok, len(head) + len(tok))
        sep = two[len(head) + len(tok):second] if second > 0 else ""
        if not (tail.startswith(sep) and two == head + (tok + sep) * 2 + tail[len(sep):]):
            sep = ""   # images not laid out as repeated blocks: single-image prompts stay exact
        return (head + "{image}" + tail[len(sep):]).replace(PROMPT_SLOT, "{prompt}"), sep

    # -- Reference -----------------------------------------------------------------------------
    def pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        out = self.processor.image_processor(images=list(images), return_tensors="pt", **self.image_kwargs)
        px = out["pixel_values"]
        return px.reshape(-1, *px.shape[-3:]).float()

    def input_ids(self, prompt: str, n_images: int = 1) -> list[int]:
        out = self.processor(text=self.text(prompt, n_images), images=self.blank_images(n_images, (32, 32)) or None,
                             **self.image_kwargs)
        return [int(i) for i in out["input_ids"][0]]

    @torch.no_grad()
    def generate(self, images, prompt, max_new_tokens):
        inputs = self.processor(text=self.text(prompt, len(images)), images=list(images), return_tensors="pt",
                                **self.image_kwargs)
        # kwargs outrank the checkpoint's generation_config: plain greedy, nothing else
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                                  num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                  eos_token_id=self.eos, pad_token_id=self._pad_id())
        new = [int(t) for t in out[0, inputs["input_ids"].shape[1]:]]
        stop = next((i for i, t in enumerate(new) if t in self.eos), len(new))
        return new[:stop]

    def _pad_id(self) -> int:
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.model.config.get_text_config().pad_token_id
        return int(pad if pad is not None else self.eos[0])


def derive_prompt(ref: HFReference, checkpoint: Path, image_token_id: int, image_size: tuple[int, int],
                  bos_token_id: int | None, prompts=SAMPLE_PROMPTS) -> tuple[dict, bool, Path]:
    """-> (prompt spec, add_special_tokens, tokenizer.json to ship), proved on ``prompts``
    against the processor's ids.

    The template is the chat template rendered around a sentinel; the per-image text is the
    processor's expansion of one image plus whatever the template puts after each image (found
    by rendering one and two images), so several images render as the processor renders them.
    The checkpoint's tokenizer.json is shipped as is when it reproduces the processor's ids;
    otherwise the tokenizer as transformers built it in memory (transformers 5 rebuilds some
    pipelines, e.g. Llama's, from tokenizer_config) is serialised and tried.
    """
    template, sep = ref.prompt_layout()
    block = ref.image_block(image_size) + sep
    expected = {p: ref.input_ids(p, 1) for p in prompts}
    spec = {"image_block": block, "image_token_id": int(image_token_id),
            "image_seq_len": int(expected[prompts[0]].count(image_token_id))}

    first_error = None
    for tokenizer_file in (checkpoint / "tokenizer.json", None):
        if tokenizer_file is None:
            tokenizer_file = _serialised_tokenizer(ref.processor.tokenizer)
        found = _match_tokenizer(tokenizer_file, template, block, bos_token_id, expected)
        if isinstance(found, tuple):
            tmpl, add = found
            return {"template": tmpl, **spec}, add, tokenizer_file
        first_error = first_error or found
    raise ExportError(f"tokenizer.json cannot reproduce the processor's input ids: {first_error}; the runtime "
                      "would build different prompts")


def _serialised_tokenizer(hf_tokenizer) -> Path:
    import atexit
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="edgevl-tokenizer-"))
    atexit.register(shutil.rmtree, folder, True)
    hf_tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def _match_tokenizer(tokenizer_file: Path, template: str, block: str, bos_token_id, expected: dict):
    """(template, add_special_tokens) under which ``tokenizer_file`` gives the expected ids, or why not."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    bos_text = tokenizer.id_to_token(bos_token_id) if bos_token_id is not None else None
    choices = [(template, False), (template, True)] + ([(bos_text + template, False)] if bos_text else [])
    for tmpl, add in choices:
        if all(tokenizer.encode(render_prompt(tmpl, p, block, 1), add_special_tokens=add).ids == ids
               for p, ids in expected.items()):
            return tmpl, add
    p, want = next(iter(expected.items()))
    got = tokenizer.encode(render_prompt(template, p, block, 1), add_special_tokens=False).ids
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return (f"for {p!r} they first differ at position {first} (tokenizer.json {got[first:first + 8]}, "
            f"processor {want[first:first + 8]})")


def check_vision(where: str, ours: torch.nn.Module, theirs, pixels: torch.Tensor, image_seq_len: int,
                 atol: float = 1e-4) -> None:
    """The export's vision module must equal the HF model's own image features on the same pixels."""
    with torch.no_grad():
        got = ours(pixels)
        want = theirs(pixels).reshape(got.shape)
    if got.shape[1] != image_seq_len:
        raise ExportError(f"{where}: the vision part gives {got.shape[1]} embeddings per image but the processor "
                          f"puts {image_seq_len} image tokens in the prompt")
    diff = float((got - want).abs().max())
    if diff > atol:
        raise ExportError(f"{where}: the export's vision module differs from the HF model's image features by "
                          f"{diff:.3g} (tolerance {atol:g})")
