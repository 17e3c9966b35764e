"""Saving ONNX models the same way everywhere on the compile side (torch-free)."""

from __future__ import annotations

from pathlib import Path

PROTOBUF_LIMIT = (1 << 31) - (1 << 26)      # serialized protobuf must stay under 2 GB (with a margin)


def save_onnx(model, path: str | Path) -> Path:
    """Save ``model`` at ``path``, its weights in one external ``<name>.data`` file when the
    serialized model would pass protobuf's 2 GB limit."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path
