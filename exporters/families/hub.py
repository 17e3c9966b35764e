"""Hugging Face Hub ids for ``--model`` (``Qwen/Qwen2.5-VL-3B-Instruct``), as optimum-cli and
transformers users expect, resolved by ``huggingface_hub`` into its own cache.

``snapshot_download`` downloads where the network allows and, offline (``HF_HUB_OFFLINE=1``
or no connection), answers from the local cache; either way the result is a snapshot
directory in the ``save_pretrained`` layout that the family specs read. Only the files an
export reads are fetched (configs, safetensors weights, tokenizer, processor and chat
template), not the ONNX, GGUF or pickle files some model repositories also hold.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgevl.errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")
EXPORT_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def looks_like_hub_id(model: str) -> bool:
    """``org/name`` (optionally ``@revision``) that is not an existing local path."""
    return bool(HUB_ID.match(model)) and not Path(model).exists() and not model.startswith((".", "/"))


def resolve_hub_id(model: str) -> Path:
    """The local snapshot directory of a Hub id (downloaded, or from the cache offline)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:
        raise CheckpointError(f"{model}: a Hugging Face Hub id needs huggingface_hub: pip install edgevl[export]") from e
    repo_id, _, revision = model.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=EXPORT_FILES))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"{model}: not in the local Hugging Face cache and the Hub cannot be reached "
                              "(offline or HF_HUB_OFFLINE=1); download it once where the network allows "
                              f"(`hf download {repo_id}`) or pass a local checkpoint directory") from e
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise CheckpointError(f"{model}: no such model on the Hugging Face Hub ({type(e).__name__}); check the id, "
                              "or log in (`hf auth login`) for a gated or private model") from e
    except OSError as e:       # network errors with no cached copy, disk errors
        raise CheckpointError(f"{model}: could not fetch it from the Hugging Face Hub: {e}") from e
