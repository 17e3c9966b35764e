"""Export specs, one file per model family; importing this package registers them all."""

from edgevl.exporters.families import deepseek_vl, edgevl_tiny, llava, smolvlm  # noqa: F401
from edgevl.exporters.families.base import FAMILIES, resolve_family  # noqa: F401
