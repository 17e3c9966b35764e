"""PyTorch part -> ONNX file, with the edgevl part contract's names and dynamic axes.

We use the TorchScript-based exporter (``dynamo=False``): it handles the KV-cache decoder with
symbolic batch/sequence/capacity axes in one trace, exports NNCF's fake-quant modules as
standard QuantizeLinear/DequantizeLinear (the dynamo exporter cannot, see
../shared/MEASURED.md item 8), and gives graphs ONNX Runtime, OpenVINO and TensorRT all parse.
Examples always have batch 2 so no axis is specialised to 1 by accident.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from edgevl.errors import ExportError
from edgevl.models.decoder import Decoder, fuse_projections

OPSET = 17
MAX_IR_VERSION = 10                 # ONNX Runtime 1.31 rejects IR 14 (MEASURED.md item 5)
EXTERNAL_DATA_THRESHOLD = 2 << 30   # protobuf's 2 GB limit: bigger weights go to external data


class DecoderForExport(torch.nn.Module):
    """Flat-I/O wrapper: (inputs_embeds, past_len, past_key.0, past_value.0, ..., extras) ->
    (logits of the last position, present_key.0, present_value.0, ...). ``extras`` are the
    inputs only some decoder variants have (``decoder_extra_inputs``), after the cache."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder
        self.extras = decoder_extra_inputs(decoder.spec)

    def forward(self, inputs_embeds, past_len, *rest):
        n_past = len(rest) - len(self.extras)
        past, extras = rest[:n_past], dict(zip(self.extras, rest[n_past:]))
        logits, keys, values = self.decoder(inputs_embeds, list(past[0::2]), list(past[1::2]), past_len,
                                            last_only=True, **extras)
        out = [logits[:, 0, :]]
        for k, v in zip(keys, values):
            out += [k, v]
        return tuple(out)


def decoder_extra_inputs(spec) -> list[str]:
    """Graph inputs a decoder variant adds after the cache, in this order; none for every other
    decoder, so their graphs and I/O stay as they were: ``position_ids`` (3, B, T) int64 with
    multimodal RoPE (``mrope_section``), ``image_span`` (B, 2) int64 with ``image_bidirectional``."""
    return (["position_ids"] if spec.mrope_section else []) + (["image_span"] if spec.image_bidirectional else [])


def decoder_io_names(n_layers: int, extras: list[str] | tuple = ()) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present_{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]
    return ["inputs_embeds", "past_len", *past, *extras], ["logits", *present]


def decoder_example(decoder: Decoder, batch: int = 2, seq: int = 3, capacity: int = 8):
    spec = decoder.spec
    dtype = decoder.embed_tokens.weight.dtype
    embeds = torch.randn(batch, seq, spec.hidden_dim, dtype=dtype) * 0.02
    past_len = torch.tensor([capacity - seq, 1][:batch] + [0] * max(0, batch - 2), dtype=torch.int64)
    past = [torch.zeros(batch, spec.n_kv_heads, capacity, spec.head_dim, dtype=dtype)
            for _ in range(2 * spec.n_layers)]
    extras = []
    if spec.mrope_section:   # text positions, the height and width axes shifted so no two axes are equal
        text = past_len[:, None] + torch.arange(seq)[None, :]
        extras.append(torch.stack((text, text + 1, text + 2)))
    if spec.image_bidirectional:     # row 0: a block over its first two new tokens; the others: none
        extras.append(torch.stack([past_len, past_len + torch.tensor([2] + [0] * (batch - 1))], dim=1))
    return (embeds, past_len, *past, *extras)


def _export(module: torch.nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes,
            part: str) -> Path:
    module.eval()
    buffer = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(buffer), \
                contextlib.redirect_stdout(buffer):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True,
                              dynamo=False)
    except Exception as e:  # torch raises many types (OnnxExporterError, SymbolicValueError, RuntimeError...)
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        op = _unsupported_op(str(e))
        hint = (f"operator {op} cannot be lowered to ONNX opset {OPSET}; rewrite it with supported ops in the "
                "family's export spec (a forward patch) or raise the opset" if op else
                "see the traceback above for the failing module")
        raise ExportError(f"exporting part {part!r} to ONNX failed: {text} ({hint})") from e
    _finalize(path)
    return path


def _unsupported_op(message: str) -> str | None:
    import re

    m = re.search(r"(?:Exporting the operator|operator) ['`]?([\w:.]+)['`]? (?:to ONNX|is not supported)", message)
    return m.group(1) if m else None


def _finalize(path: Path) -> None:
    """Clamp the IR version for older runtimes; move big weights to external data, one file.

    Over protobuf's 2 GB the exporter itself writes every weight to a file of its own beside
    the graph (a 262k x 2560 embedding, Gemma 3's, is 2.7 GB alone); those are gathered into
    the one ``<part>.onnx.data`` file and removed. The size is summed over the weights, since
    ``ByteSize`` cannot serialise a model past 2 GB to measure it."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    strays = {e.value for t in model.graph.initializer if uses_external_data(t)
              for e in t.external_data if e.key == "location"} - {path.name + ".data"}
    load_external_data_for_model(model, str(path.parent))
    changed = False
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        changed = True
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if strays or weights > EXTERNAL_DATA_THRESHOLD or (path.with_suffix(path.suffix + ".data")).exists():
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        for name in strays:
            (path.parent / name).unlink(missing_ok=True)
    elif changed:
        onnx.save_model(model, str(path))


def export_vision(vision: torch.nn.Module, pixel_shape: tuple, path: Path) -> Path:
    example = torch.randn(2, *pixel_shape)
    _export(vision, (example,), path, ["pixel_values"], ["image_embeds"],
            {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}, "vision")
    with torch.no_grad():
        n_tokens, dim = vision(example[:1]).shape[1:]
    set_output_dims(path, "image_embeds", ["batch", int(n_tokens), int(dim)])
    return path


def set_output_dims(path: Path, name: str, dims: list) -> None:
    """Write known dims into a graph output (the tracer leaves some static dims symbolic).
    Loads without external data, so tensors stored outside keep pointing at their file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for out in model.graph.output:
        if out.name == name:
            for d, value in zip(out.type.tensor_type.shape.dim, dims):
                if isinstance(value, int):
                    d.ClearField("dim_param")
                    d.dim_value = value
                else:
                    d.dim_param = value
    onnx.save_model(model, str(path))


def export_embed(embed: torch.nn.Module, path: Path) -> Path:
    example = torch.zeros(2, 3, dtype=torch.int64)
    return _export(embed, (example,), path, ["input_ids"], ["inputs_embeds"],
                   {"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}}, "embed")


def export_decoder(decoder: Decoder, path: Path, fuse: bool = True) -> Path:
    """``fuse`` exports the stacked-projection layout (``fuse_projections``: fewer, larger
    MatMuls, ~25% faster INT8 weight-only decode on ONNX Runtime, benchmarks/results/);
    QAT passes False because its fake-quant modules wrap the separate projections."""
    if fuse:
        decoder = fuse_projections(decoder)
    extras = decoder_extra_inputs(decoder.spec)
    names_in, names_out = decoder_io_names(decoder.spec.n_layers, extras)
    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "past_len": {0: "batch"}, "logits": {0: "batch"},
            "position_ids": {1: "batch", 2: "seq"}, "image_span": {0: "batch"}}
    axes.update({n: {0: "batch", 2: "capacity"} for n in names_in[2:len(names_in) - len(extras)]})
    axes.update({n: {0: "batch", 2: "seq"} for n in names_out[1:]})
    axes = {k: v for k, v in axes.items() if k in names_in or k in names_out}
    return _export(DecoderForExport(decoder), decoder_example(decoder), path, names_in, names_out, axes, "decoder")


def io_spec(path: Path) -> tuple[list[dict], list[dict]]:
    """Input/output names, dtypes and shapes (dim names for dynamic axes) of an ONNX file."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": dtype, "shape": shape})
        return out

    return describe(model.graph.input), describe(model.graph.output)
