"""Export specs, one file per model family; importing this package registers them all."""

from edgevl.exporters.families import (blip2, deepseek_vl, edgevl_tiny, gemma3, internvl,  # noqa: F401
                                    llava, qwen2_vl, refused, smolvlm)
from edgevl.exporters.families.base import FAMILIES, resolve_family  # noqa: F401
