"""Export spec for Qwen2-VL (``Qwen2VLForConditionalGeneration``) and Qwen2.5-VL
(``Qwen2_5_VLForConditionalGeneration``): one file, because the two differ only inside the
vision tower (2.5: RMSNorm/SwiGLU blocks, window attention in all but its ``fullatt_block_indexes``).

**One image size per bundle, fixed at build time.** The HF processor resizes each image to its
own grid (``smart_resize``: aspect kept, sides multiples of ``patch * merge``, pixels between
min/max), so the image block's length changes with every aspect ratio. edgevl bundles keep one
fixed image block (KV-cache sizing, batching and TensorRT profiles rely on it), so the bundle
is built for one ``(W, H)`` (``--image-size WxH``; default: the processor's ``smart_resize`` of a
448x448 view, 256 tokens with patch 14 and merge 2, clamped into its min/max pixels) and every
image is stretched to it. The reference is the processor and model on the image stretched to
that size (for which the processor's own resize changes nothing), recorded in
``preprocess.fixed_size`` and ``mrope.image_size``.

**The vision part takes the image, not the processor's flattened patches.** The processor's
layout (``(grid_t*grid_h*grid_w, C*T*P*P)``, patches grouped by 2x2 merge block, every frame
duplicated ``temporal_patch_size`` times) is a fixed reshape for a fixed size, so it lives in the
graph; the runtime keeps the preprocessing every edgevl bundle has (resize, rescale,
normalize: ``edgevl.preprocess``), int8 calibration feeds images as for every family, and the
duplicated frame is folded into the patch embedding (a Conv3d over identical frames is one
linear map with the kernel summed over time: half the work). ``flatten_patches`` is that
layout in numpy, tested equal to the processor's ``pixel_values``.

Window attention (2.5) is computed with a block mask over the image's own token order instead
of HF's permute-into-windows: attention is order-equivariant, so the result is the same, and a
mask is one constant per bundle. Video input is refused; so are checkpoints whose
processor or vision tower settings this file does not reproduce.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from edgevl.errors import ExportError, UnsupportedArchitecture
from edgevl.exporters.families.base import ExportableVLM, register
from edgevl.exporters.families.hf_base import HFFamilySpec, HFReference, eos_ids, image_only_processor, \
    interpolation, normalisation

DEFAULT_VIEW = 448          # the side of the square view the default size is derived from
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The processor's rule (transformers' qwen2_vl ``smart_resize``): sides multiples of
    ``factor``, pixels within [min, max], aspect kept as closely as possible."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def flatten_patches(pixels: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """(B, C, H, W) normalised images -> the processor's ``pixel_values`` (B*N, C*T*P*P): patches
    ordered by merge block then row/column inside it, each frame repeated ``temporal`` times."""
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 2, 5, 3, 6, 1, 4, 7)                          # (B, gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, :, None], (*x.shape[:6], temporal, patch, patch))
    return np.ascontiguousarray(x.reshape(b * gh * gw, c * temporal * patch * patch))


def unflatten_patches(flat: np.ndarray, size: tuple[int, int], patch: int, merge: int, temporal: int) -> np.ndarray:
    """The inverse of ``flatten_patches`` (first frame; the others must be equal) -> (B, C, H, W)."""
    h, w = size
    gh, gw = h // patch, w // patch
    x = flat.reshape(-1, gh // merge, gw // merge, merge, merge, 3, temporal, patch, patch)
    frames = [x[:, :, :, :, :, :, t] for t in range(temporal)]
    if not all(np.array_equal(frames[0], f) for f in frames[1:]):
        raise UnsupportedArchitecture("the processor's temporal patches differ: video frames, not one image")
    x = frames[0].transpose(0, 5, 1, 3, 6, 2, 4, 7)                    # (B, C, gh/m, m, P, gw/m, m, P)
    return np.ascontiguousarray(x.reshape(-1, 3, h, w))


def stretch(image: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    from edgevl.preprocess import resize_image

    return resize_image(np.asarray(image), {"size": list(size), "resize_mode": "stretch", "interpolation": resample})


class QwenVision(torch.nn.Module):
    """pixel_values (B, 3, H, W) -> image_embeds (B, H*W / (P*m)^2, D), for the one (H, W) it
    was built for: patch embedding, the vision blocks (rotary tables and window mask are
    constants of the grid), the patch merger. The HF modules are used as they are, except the
    attention, written batched (HF's packs all images into one sequence)."""

    def __init__(self, visual, config, size: tuple[int, int]):
        super().__init__()
        from transformers.vision_utils import get_vision_position_ids

        self.patch, self.merge = config.patch_size, config.spatial_merge_size
        self.size = size
        gh, gw = size[0] // self.patch, size[1] // self.patch
        conv = visual.patch_embed.proj.weight.detach()                    # (D, C, T, P, P)
        self.embed = torch.nn.Linear(conv.shape[1] * self.patch ** 2, conv.shape[0], bias=False)
        self.embed.weight = torch.nn.Parameter(conv.sum(2).reshape(conv.shape[0], -1), requires_grad=False)
        self.blocks, self.merger = visual.blocks, visual.merger
        grid = torch.tensor([[1, gh, gw]])
        positions = get_vision_position_ids(grid, self.merge)             # (N, 2) row, column in processor order
        cos, sin = visual.rotary_pos_emb(torch.zeros(1), positions)       # (N, Dh)
        self.register_buffer("cos", cos.float(), persistent=False)
        self.register_buffer("sin", sin.float(), persistent=False)
        full = set(getattr(config, "fullatt_block_indexes", None) or range(len(self.blocks)))
        self.windowed = [i not in full for i in range(len(self.blocks))]
        if any(self.windowed):
            self.register_buffer("window_masked", self._window_mask(positions, config), persistent=False)

    def _window_mask(self, positions: torch.Tensor, config) -> torch.Tensor:
        """(N, N) True where two patches are in different attention windows: HF's windows are
        squares of ``window_size // merge // patch`` merged tokens from the top-left corner."""
        side = config.window_size // self.merge // self.patch
        merged = positions // self.merge                                   # (N, 2) merged row/column
        per_row = self.size[1] // self.patch // self.merge // side + 1      # windows per row, at least
        window = (merged[:, 0] // side) * per_row + merged[:, 1] // side
        return window[:, None] != window[None, :]

    def attend(self, attn, x: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        heads = attn.num_heads
        q, k, v = attn.qkv(x).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)   # (B, heads, N, Dh) each
        half = (d // heads) // 2
        q = q * self.cos + torch.cat((-q[..., half:], q[..., :half]), -1) * self.sin
        k = k * self.cos + torch.cat((-k[..., half:], k[..., :half]), -1) * self.sin
        scores = (q @ k.transpose(-1, -2)) * (d // heads) ** -0.5
        if masked is not None:
            scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return attn.proj(out)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixel_values.shape
        p, m = self.patch, self.merge
        x = pixel_values.reshape(b, c, h // p // m, m, p, w // p // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = self.embed(x.reshape(b, (h // p) * (w // p), c * p * p))      # (B, N, D), processor patch order
        for block, windowed in zip(self.blocks, self.windowed):
            x = x + self.attend(block.attn, block.norm1(x), self.window_masked if windowed else None)
            x = x + block.mlp(block.norm2(x))
        merged = self.merger.ln_q(x).reshape(b, x.shape[1] // (m * m), -1)
        return self.merger.mlp(merged)


class QwenReference(HFReference):
    """The processor and model on images stretched to the bundle's size (see the module
    docstring): the processor then keeps that size, and every image gives the same block."""

    def __init__(self, model, processor, eos, size: tuple[int, int], resample: str):
        super().__init__(model, processor, eos)
        self.size, self.resample = size, resample
        ip = processor.image_processor
        self.layout = (ip.patch_size, ip.merge_size, ip.temporal_patch_size)

    def image_block(self, size: tuple[int, int]) -> str:
        """The chat template writes <|vision_start|><|image_pad|><|vision_end|> per image; the whole
        of it is the image block, so a prompt with several images repeats it as the template does."""
        return VISION_START + super().image_block(size) + VISION_END

    def prompt_layout(self) -> tuple[str, str]:
        template, _ = super().prompt_layout()
        wrapped = VISION_START + "{image}" + VISION_END
        if wrapped not in template:
            raise ExportError(f"the chat template rendered {template!r}: expected {VISION_START}<image>{VISION_END}")
        return template.replace(wrapped, "{image}"), ""

    def fit(self, images) -> list[np.ndarray]:
        return [stretch(image, self.size, self.resample) for image in images]

    def blank_images(self, n: int, shape: tuple[int, int]) -> list[np.ndarray]:
        return super().blank_images(n, self.size)

    def pixels(self, images) -> torch.Tensor:
        out = self.processor.image_processor(images=self.fit(images), return_tensors="np")
        return torch.from_numpy(unflatten_patches(out["pixel_values"], self.size, *self.layout)).float()

    def generate(self, images, prompt, max_new_tokens):
        return super().generate(self.fit(images), prompt, max_new_tokens)


def default_size(ip) -> tuple[int, int]:
    factor = ip.patch_size * ip.merge_size
    return smart_resize(DEFAULT_VIEW, DEFAULT_VIEW, factor, int(ip.size["shortest_edge"]), int(ip.size["longest_edge"]))


def check_size(size: tuple[int, int], ip, where: str) -> tuple[int, int]:
    """(H, W) the bundle is built for: multiples of patch * merge, within the processor's pixels."""
    factor = ip.patch_size * ip.merge_size
    lo, hi = int(ip.size["shortest_edge"]), int(ip.size["longest_edge"])
    h, w = size
    if h % factor or w % factor or not lo <= h * w <= hi:
        ok = smart_resize(h, w, factor, lo, hi)
        raise UnsupportedArchitecture(
            f"{where}: --image-size {w}x{h} is not a size this processor produces: width and height must be "
            f"multiples of {factor} (patch {ip.patch_size} x merge {ip.merge_size}) with {lo} to {hi} pixels; "
            f"the nearest is {ok[1]}x{ok[0]}")
    return h, w


@register
class QwenVLSpec(HFFamilySpec):
    name = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "qwen2_vl",
                     "qwen2_5_vl")
    model_class = "Qwen2_5_VLForConditionalGeneration"
    options = ("image_size",)

    def __init__(self, image_size: tuple[int, int] | None = None):
        self.image_size = image_size       # (W, H) as on the command line, or None for the default

    def check_config(self, config, where: str) -> None:
        vision = config.vision_config
        if vision.temporal_patch_size < 1 or getattr(vision, "in_channels", 3) != 3:
            raise UnsupportedArchitecture(f"{where}: vision tower with in_channels={vision.in_channels} is not "
                                          "supported (RGB images, 3 channels)")

    def load(self, path: Path) -> ExportableVLM:
        import transformers as tf

        path = Path(path)
        where, config, arch, model = self.open(path, "Qwen2-VL/Qwen2.5-VL")
        processor = image_only_processor(tf.Qwen2_5_VLProcessor if "2_5" in arch else tf.Qwen2VLProcessor, path)
        ip = processor.image_processor
        if not ip.do_resize:
            raise UnsupportedArchitecture(f"{where}: image processor do_resize=False is not supported (the bundle "
                                          "encodes one fixed image size)")
        size = check_size((self.image_size[1], self.image_size[0]), ip, where) if self.image_size else \
            default_size(ip)
        resample = interpolation(ip.resample, where)
        vision_config = config.vision_config
        merged_grid = [size[0] // ip.patch_size // ip.merge_size, size[1] // ip.patch_size // ip.merge_size]
        preprocess = {"size": list(size), "resize_mode": "stretch", "interpolation": resample, **normalisation(ip),
                      "fixed_size": {"image_size": [size[1], size[0]], "why": (
                          "the processor resizes each image to its own aspect-kept grid; the bundle encodes one fixed "
                          "image block, so images are stretched to the size chosen at build time (--image-size WxH)")}}
        ref = QwenReference(model, processor, eos_ids(model), size, resample)
        vision = QwenVision(model.model.visual, vision_config, size)
        layout = (ip.patch_size, ip.merge_size, ip.temporal_patch_size)

        def hf_features(px):
            flat = torch.from_numpy(flatten_patches(px.numpy(), *layout))
            grid = torch.tensor([[1, size[0] // ip.patch_size, size[1] // ip.patch_size]] * px.shape[0])
            return torch.stack(model.model.get_image_features(flat, image_grid_thw=grid).pooler_output)

        mrope = {"section": list(config.text_config.rope_parameters["mrope_section"]),
                 "image_token_id": int(config.image_token_id), "grid": merged_grid,
                 "video_token_id": int(config.video_token_id),
                 "image_size": [size[1], size[0]]}
        return self.assemble(path, where, arch, model, config, ref, vision=vision,
                             text_model=model.model.language_model, size=size, preprocess=preprocess,
                             hf_features=hf_features, manifest_extra={"mrope": mrope})
