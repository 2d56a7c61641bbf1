"""Parse a big ONNX file one field at a time, so that its bytes and its message are never
both whole in memory.

`onnx.load` reads the whole file and then builds the message: a model with inline weights
peaks at twice its size (BERT-base: 717 MB for a 340 MB file; docs/decisions.md, piecewise
parse). A serialized protobuf message is a sequence of fields, and parsing a concatenation
merges the parts (repeated fields append in order, scalars keep the last), so the model is
built by merging each top-level field, and each field of the graph wrapped back into a
one-field ModelProto, read one at a time: the peak is the message plus the largest field.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO

import onnx

GRAPH_FIELD = 7  # ModelProto.graph
# Pieces smaller than this are merged together, saving a protobuf call per node.
BATCH_BYTES = 1 << 22
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


class Malformed(ValueError):
    """The bytes are not a sequence of protobuf fields ptqconv can split."""


def parse_model(path: str) -> onnx.ModelProto:
    """The ModelProto in the file at `path`, equal to onnx.load's (without external data).
    Raises Malformed when the file cannot be split into fields, and protobuf's error when
    a piece does not parse."""
    model = onnx.ModelProto()
    batch: list[bytes] = []
    batched = 0
    with open(path, "rb", buffering=1 << 16) as f:
        for piece in _pieces(f):
            if batched + len(piece) > BATCH_BYTES and batch:
                model.MergeFromString(b"".join(batch))
                batch, batched = [], 0
            batch.append(piece)
            batched += len(piece)
        if batch:
            model.MergeFromString(b"".join(batch))
    return model


def _pieces(f: BinaryIO) -> Iterator[bytes]:
    """The serialized fields of the ModelProto in `f`, the graph's split into its own
    fields, each wrapped as a ModelProto holding a graph with that field alone."""
    end = f.seek(0, io.SEEK_END)
    f.seek(0)
    while f.tell() < end:
        start = f.tell()
        tag = _varint(f)
        if tag >> 3 == GRAPH_FIELD and tag & 7 == _BYTES:
            graph_end = _varint(f) + f.tell()
            if graph_end > end:
                raise Malformed("graph runs past the end of the file")
            while f.tell() < graph_end:
                field = _field(f, graph_end)
                yield _key(GRAPH_FIELD, _BYTES) + _encode_varint(len(field)) + field
        else:
            f.seek(start)
            yield _field(f, end)


def _field(f: BinaryIO, limit: int) -> bytes:
    """The bytes of the field starting at the current position, tag included."""
    start = f.tell()
    wire = _varint(f) & 7
    if wire == _VARINT:
        _varint(f)
    elif wire == _FIXED64:
        f.seek(8, io.SEEK_CUR)
    elif wire == _FIXED32:
        f.seek(4, io.SEEK_CUR)
    elif wire == _BYTES:
        f.seek(_varint(f), io.SEEK_CUR)
    else:
        raise Malformed(f"wire type {wire}")
    stop = f.tell()
    if stop > limit:
        raise Malformed("field runs past its message")
    f.seek(start)
    return f.read(stop - start)


def _varint(f: BinaryIO) -> int:
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise Malformed("truncated varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise Malformed("varint too long")


def _key(field: int, wire: int) -> bytes:
    return _encode_varint(field << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
