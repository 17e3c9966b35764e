"""Families edgevl recognises but does not export yet (exporters/families/refused.py): refused
from config.json alone, before any weight is read, naming what is missing."""

from __future__ import annotations

import pytest

from conftest import has_module, needs_torch

pytestmark = [needs_torch, pytest.mark.skipif(not has_module("transformers"),
                                              reason="needs transformers: pip install edgevl[export]")]


def _config_only(tmp_path, config_cls, arch: str):
    out = tmp_path / arch
    config = config_cls()
    config.architectures = [arch]
    config.save_pretrained(out)
    return out


@pytest.mark.parametrize("config_name, arch, needles", [
    ("PaliGemmaConfig", "PaliGemmaForConditionalGeneration", ("PaliGemma", "prefix-LM", "soft-capping")),
])
def test_recognised_but_unsupported_family_is_refused_with_its_reason(tmp_path, config_name, arch, needles):
    import transformers

    from edgevl.errors import UnsupportedArchitecture
    from edgevl.exporters.export import export_model

    ckpt = _config_only(tmp_path, getattr(transformers, config_name), arch)
    with pytest.raises(UnsupportedArchitecture) as e:
        export_model(ckpt, tmp_path / "out", log=lambda *a: None)
    msg = str(e.value)
    assert all(n in msg for n in needles), msg
    assert "InternVL" in msg                       # what to use meanwhile
    assert not (tmp_path / "out").exists()


def test_refused_families_are_not_listed_as_supported(tmp_path):
    import transformers

    from edgevl.errors import UnsupportedArchitecture
    from edgevl.exporters.families.base import resolve_family

    ckpt = _config_only(tmp_path, transformers.MistralConfig, "MistralForCausalLM")
    with pytest.raises(UnsupportedArchitecture) as e:
        resolve_family(ckpt)
    msg = str(e.value)
    assert "InternVLForConditionalGeneration" in msg and "Blip2ForConditionalGeneration" in msg
    assert "Qwen2VLForConditionalGeneration" in msg and "Qwen2_5_VLForConditionalGeneration" in msg
    assert "Gemma3ForConditionalGeneration" in msg and "PaliGemma" not in msg
