"""The files an ONNX graph makes its runtime open: external-data locations, read without `onnx`.

ONNX Runtime and OpenVINO load a tensor stored outside the graph from ``external_data``'s
``location``, relative to the model's folder. Before a runner sees a bundle part, the bundle's
containment check (edgevl.containment) needs those locations, and the device runtime has no
`onnx` package, so this module walks the protobuf wire format itself: only the messages that
can hold a tensor are entered (graph initializers and sparse initializers, node attributes,
subgraphs, functions); raw weights are skipped by their length, never copied. Malformed input
raises BundleError, never IndexError or RecursionError.

Field numbers are onnx.proto's (a test checks them against the installed onnx package).
"""

from __future__ import annotations

import mmap
from pathlib import Path

from edgevl.errors import BundleError

MAX_DEPTH = 64                 # nested subgraphs (If/Loop bodies); real graphs use a handful

# (message, field number) -> message type of that field, for the fields that can lead to a tensor
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
EXTERNAL = 1                   # TensorProto.DataLocation.EXTERNAL

_CHILDREN = {
    "model": {_MODEL_GRAPH: "graph", _MODEL_FUNCTIONS: "function"},
    "graph": {_GRAPH_NODE: "node", _GRAPH_INITIALIZER: "tensor", _GRAPH_SPARSE_INITIALIZER: "sparse"},
    "function": {_FUNCTION_NODE: "node"},
    "node": {_NODE_ATTRIBUTE: "attribute"},
    "attribute": {_ATTR_T: "tensor", _ATTR_G: "graph", _ATTR_TENSORS: "tensor", _ATTR_GRAPHS: "graph",
                  _ATTR_SPARSE: "sparse", _ATTR_SPARSES: "sparse"},
    "sparse": {_SPARSE_VALUES: "tensor", _SPARSE_INDICES: "tensor"},
}


class _Malformed(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, wire type, value or (start, stop) of a length-delimited field)."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed("truncated fixed-width field")
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _Malformed("length-delimited field runs past its message")
            yield number, wire, (pos, pos + size)
            pos += size
        else:
            raise _Malformed(f"unsupported wire type {wire}")


def _tensor_location(buf, start: int, end: int) -> str | None:
    external, location = False, None
    for number, wire, value in _fields(buf, start, end):
        if number == _TENSOR_DATA_LOCATION and wire == 0:
            external = value == EXTERNAL
        elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
            key = val = None
            for n, w, v in _fields(buf, *value):
                if w == 2 and n in (_ENTRY_KEY, _ENTRY_VALUE):
                    text = bytes(buf[v[0]:v[1]]).decode("utf-8", errors="replace")
                    key, val = (text, val) if n == _ENTRY_KEY else (key, text)
            if key == "location":
                location = val
    return location if external else None


def _walk(buf, kind: str, start: int, end: int, depth: int, found: list[str]) -> None:
    if depth > MAX_DEPTH:
        raise _Malformed(f"subgraphs nested deeper than {MAX_DEPTH}")
    if kind == "tensor":
        location = _tensor_location(buf, start, end)
        if location is not None:
            found.append(location)
        return
    children = _CHILDREN[kind]
    for number, wire, value in _fields(buf, start, end):
        child = children.get(number)
        if child is not None and wire == 2:
            _walk(buf, child, value[0], value[1], depth + 1, found)


def external_data_locations(path: str | Path) -> list[str]:
    """The distinct ``location`` strings of every externally stored tensor in the ONNX file."""
    path = Path(path)
    found: list[str] = []
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                raise BundleError(f"{path}: ONNX file is empty; the bundle is damaged, rebuild it")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    _walk(view, "model", 0, len(mm), 0, found)
                finally:
                    view.release()
    except _Malformed as e:
        raise BundleError(f"{path}: not a readable ONNX file ({e}); the bundle is damaged, rebuild it") from e
    return list(dict.fromkeys(found))
