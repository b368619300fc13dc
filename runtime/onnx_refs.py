"""The external-data files an ONNX model references, read straight from the protobuf wire format.

ONNX keeps large initializers outside the .onnx file: a TensorProto with data_location EXTERNAL
names its file in external_data["location"], relative to the model's directory. ONNX Runtime opens
those files itself, so the runtime lists them first and checks that each one lies inside the
engine directory and is hashed by the manifest (runtime/engine_checks.py, check_graph_files).

No onnx import (the runtime must not need it): a small protobuf reader that descends only into
the messages that can hold a tensor and seeks past everything else (raw_data included), so a
multi-GB graph is scanned without being read into memory.

    external_data_locations("engines/llava/decoder.onnx")  # -> ["decoder.onnx.data"]
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

from runtime.errors import EngineError

MAX_DEPTH = 64  # nested messages; a subgraph costs 3 levels (node -> attribute -> graph)
MAX_ENTRY = 1 << 16  # bytes of one external_data key/value entry

# Message kinds and the fields of each that can lead to a TensorProto (onnx/onnx.proto, onnx 1.23).
_MODEL, _TRAINING, _FUNCTION, _GRAPH, _NODE, _ATTRIBUTE, _SPARSE, _TENSOR = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto (attribute defaults)
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},  # attribute
    # t, g, tensors, graphs, sparse_tensor, sparse_tensors
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _TENSOR: {},
}
_TENSOR_EXTERNAL_DATA = 13  # repeated StringStringEntryProto (key = 1, value = 2)
_TENSOR_DATA_LOCATION = 14  # enum: DEFAULT = 0, EXTERNAL = 1
_EXTERNAL = 1
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class _Malformed(Exception):
    """Raised inside the reader; external_data_locations turns it into a one-line EngineError."""


class _Reader:
    """Protobuf wire-format reading from a binary file, bounded by the enclosing message's end."""

    def __init__(self, f: BinaryIO):
        self.f = f

    def tell(self) -> int:
        return self.f.tell()

    def byte(self, end: int) -> int:
        if self.f.tell() >= end:
            raise _Malformed("a field runs past the end of its message")
        b = self.f.read(1)
        if not b:
            raise _Malformed("the file ends in the middle of a field (truncated?)")
        return b[0]

    def varint(self, end: int) -> int:
        value, shift = 0, 0
        while True:
            b = self.byte(end)
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
            if shift >= 70:
                raise _Malformed("a varint is longer than 10 bytes")

    def skip(self, n: int, end: int) -> None:
        if self.f.tell() + n > end:
            raise _Malformed("a field runs past the end of its message (truncated?)")
        self.f.seek(n, os.SEEK_CUR)

    def read(self, n: int, end: int) -> bytes:
        if self.f.tell() + n > end:
            raise _Malformed("a field runs past the end of its message (truncated?)")
        data = self.f.read(n)
        if len(data) != n:
            raise _Malformed("the file ends in the middle of a field (truncated?)")
        return data


def _fields(r: _Reader, end: int):
    """(field number, wire type, payload length or None) of each field up to `end`. For
    length-delimited fields the reader is left at the payload; the caller reads or skips it. Other
    wire types are skipped here."""
    while r.tell() < end:
        tag = r.varint(end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == _LEN:
            yield number, wire, r.varint(end)
        elif wire == _VARINT:
            yield number, wire, r.varint(end)  # the value, for data_location
        elif wire == _FIXED64:
            r.skip(8, end)
        elif wire == _FIXED32:
            r.skip(4, end)
        else:  # 3/4 are deprecated groups, 6/7 do not exist; ONNX uses none of them
            raise _Malformed(f"wire type {wire} in field {number}")


def _entry(data: bytes) -> tuple[str, str]:
    """A StringStringEntryProto (key = 1, value = 2) from its bytes."""
    r = _Reader(io.BytesIO(data))
    out = {1: "", 2: ""}
    for number, wire, n in _fields(r, len(data)):
        if wire != _LEN:
            continue
        raw = r.read(n, len(data))
        if number in out:
            try:
                out[number] = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _Malformed("an external_data entry is not UTF-8") from exc
    return out[1], out[2]


def _tensor(r: _Reader, end: int, found: list[str]) -> None:
    location, external = None, False
    for number, wire, n in _fields(r, end):
        if number == _TENSOR_DATA_LOCATION and wire == _VARINT:
            external = n == _EXTERNAL
        elif number == _TENSOR_EXTERNAL_DATA and wire == _LEN:
            if n > MAX_ENTRY:
                raise _Malformed(f"an external_data entry of {n} bytes")
            key, value = _entry(r.read(n, end))
            if key == "location":
                location = value
        elif wire == _LEN:
            r.skip(n, end)  # raw_data, dims, name, ...: never read
    if external and location is None:
        raise _Malformed("a tensor stored externally names no location")
    # A location without data_location EXTERNAL is not read by ONNX Runtime; list it anyway (stricter).
    if location is not None and location not in found:
        found.append(location)


def _message(r: _Reader, kind: int, end: int, depth: int, found: list[str]) -> None:
    if depth > MAX_DEPTH:
        raise _Malformed(f"messages nested deeper than {MAX_DEPTH} levels")
    if kind == _TENSOR:
        _tensor(r, end, found)
        return
    children = _CHILDREN[kind]
    for number, wire, n in _fields(r, end):
        if wire != _LEN:
            continue
        if n > end - r.tell():
            raise _Malformed("a field runs past the end of its message (truncated?)")
        child = children.get(number)
        if child is None:
            r.skip(n, end)
        else:
            _message(r, child, r.tell() + n, depth + 1, found)


def external_data_locations(path: str | Path) -> list[str]:
    """The external_data "location" strings of every tensor in the model at `path` (main graph,
    subgraphs of If/Loop/Scan attributes, functions, training graphs), in file order, each once.
    Locations are as written: relative to the model's directory, not checked here.

    Raises EngineError (one line) when the file cannot be read or is not a well-formed protobuf."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            found: list[str] = []
            _message(_Reader(f), _MODEL, size, 0, found)
            return found
    except _Malformed as exc:
        raise EngineError(f"{path.name}: not a valid ONNX model ({exc}); re-export the engine") from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise EngineError(f"{path.name}: cannot read it ({reason}); re-export the engine") from None
