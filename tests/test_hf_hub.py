"""``--model`` as a Hugging Face Hub id, resolved offline from a cache laid out the way
huggingface_hub writes it (models--org--name/refs/main + snapshots/<commit>/), populated from a
tiny checkpoint built locally: no network is used."""

from __future__ import annotations

import shutil

import pytest

from conftest import has_module, needs_torch

pytestmark = [needs_torch, pytest.mark.skipif(not (has_module("transformers") and has_module("huggingface_hub")),
                                              reason="needs transformers and huggingface_hub: pip install edgevl[export]")]

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache, with huggingface_hub in offline mode (env and its read constants)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_cache(cache, repo_id: str, checkpoint) -> object:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_hub_id_resolves_from_the_offline_cache(offline_cache, tmp_path_factory):
    import hf_tiny

    from edgevl.exporters.export import load_exportable
    from edgevl.exporters.families.base import resolve_family

    ckpt = hf_tiny.build("deepseek_vl", tmp_path_factory.mktemp("hub_src"))
    snapshot = put_in_cache(offline_cache, "tiny-org/tiny-deepseek-vl", ckpt)
    family, path = resolve_family("tiny-org/tiny-deepseek-vl")
    assert family.name == "deepseek_vl" and path.resolve() == snapshot.resolve()
    family, path = resolve_family(f"tiny-org/tiny-deepseek-vl@{COMMIT}")
    assert path.resolve() == snapshot.resolve()
    vlm = load_exportable("tiny-org/tiny-deepseek-vl")
    assert vlm.family == "deepseek_vl" and vlm.source == str(path)


def test_qwen2_5_vl_hub_id_resolves_from_the_offline_cache(offline_cache, tmp_path_factory):
    """The issue's example id, Qwen/Qwen2.5-VL-3B-Instruct, with a tiny Qwen2.5-VL checkpoint in its place."""
    import hf_tiny

    from edgevl.exporters.export import load_exportable
    from edgevl.exporters.families.base import resolve_family

    ckpt = hf_tiny.build("qwen2_5_vl", tmp_path_factory.mktemp("hub_src"))
    snapshot = put_in_cache(offline_cache, "Qwen/Qwen2.5-VL-3B-Instruct", ckpt)
    family, path = resolve_family("Qwen/Qwen2.5-VL-3B-Instruct")
    assert family.name == "qwen2_vl" and path.resolve() == snapshot.resolve()
    vlm = load_exportable("Qwen/Qwen2.5-VL-3B-Instruct", (48, 32))
    assert vlm.architecture == "Qwen2_5_VLForConditionalGeneration" and vlm.pixel_shape == (3, 32, 48)


def test_gemma3_hub_id_resolves_from_the_offline_cache(offline_cache, tmp_path_factory):
    """``google/gemma-3-4b-it`` (its repository name, a tiny checkpoint under it) goes to the Gemma 3 family."""
    import hf_tiny

    from edgevl.exporters.families.base import resolve_family

    ckpt = hf_tiny.build("gemma3", tmp_path_factory.mktemp("hub_src"))
    snapshot = put_in_cache(offline_cache, "google/gemma-3-4b-it", ckpt)
    family, path = resolve_family("google/gemma-3-4b-it")
    assert family.name == "gemma3" and path.resolve() == snapshot.resolve()


def test_hub_id_missing_offline_says_what_to_do(offline_cache):
    from edgevl.errors import CheckpointError
    from edgevl.exporters.families.base import resolve_family

    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*hf download some-org/absent"):
        resolve_family("some-org/absent")


def test_local_directory_wins_over_a_hub_id_shape(offline_cache, tmp_path, monkeypatch):
    """A relative path that exists is a directory, never a Hub lookup."""
    import hf_tiny

    from edgevl.errors import UnsupportedArchitecture
    from edgevl.exporters.families.base import resolve_family

    hf_tiny.build("llama", tmp_path / "org")           # tmp/org/llama: a local dir named like org/name
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match=r"^org/llama: architecture \['LlamaForCausalLM'\]"):
        resolve_family("org/llama")
