"""The flat configuration of edgevl-tiny; one prefix per part (vit_, mp_, lm_)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TinyVLMConfig:
    # vision encoder (ViT, pre-norm)
    vit_image_size: int = 64
    vit_patch_size: int = 8
    vit_patch_stem: str = "conv"      # "conv" (stride-2 3x3 stack) or "linear" (one patch-sized conv)
    vit_hidden_dim: int = 128
    vit_n_layers: int = 4
    vit_n_heads: int = 4
    vit_mlp_dim: int = 512
    vit_ln_eps: float = 1e-6
    # modality projector: pixel shuffle then a 2-layer MLP
    mp_pixel_shuffle: int = 2
    # language decoder (LLaMA-style)
    lm_hidden_dim: int = 192
    lm_n_layers: int = 4
    lm_n_heads: int = 6
    lm_n_kv_heads: int = 2
    lm_mlp_dim: int = 512
    lm_vocab_size: int = 64
    lm_rope_theta: float = 10000.0
    lm_rms_eps: float = 1e-5
    lm_max_position: int = 512
    lm_tie_embeddings: bool = True
    # tokens and preprocessing
    image_token_id: int = 4
    bos_token_id: int = 2
    eos_token_id: int = 3
    pad_token_id: int = 0
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    @property
    def vit_grid(self) -> int:
        return self.vit_image_size // self.vit_patch_size

    @property
    def image_seq_len(self) -> int:
        """Decoder tokens one image becomes, after the projector's pixel shuffle."""
        return (self.vit_grid // self.mp_pixel_shuffle) ** 2

    @property
    def lm_head_dim(self) -> int:
        return self.lm_hidden_dim // self.lm_n_heads

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TinyVLMConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown config fields {sorted(unknown)}")
        for key in ("image_mean", "image_std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)
