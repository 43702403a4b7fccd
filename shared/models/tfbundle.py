"""Read the variables of a TensorFlow SavedModel without TensorFlow.

A SavedModel keeps its variables in a "tensor bundle": `variables.index`, a LevelDB-format
table (sorted keys, prefix-compressed blocks, a 48-byte footer) mapping each variable's
checkpoint key to a BundleEntryProto (dtype, shape, shard, offset, size), and
`variables.data-0000N-of-0000M`, the raw little-endian tensors. Both formats are stable and
small enough to read here, which spares a 500 MB TensorFlow install to import LAION's NSFW
detectors (autokeras SavedModels). Only uncompressed tables and numeric dtypes are read, which
is what TensorFlow writes.
"""
from __future__ import annotations

import struct

import numpy as np

TABLE_MAGIC = 0xDB4775248B80FB57
# tensorflow/core/framework/types.proto
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
          10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}


class BundleError(ValueError):
    """Not a tensor bundle this reader understands."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise BundleError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> dict[int, list]:
    """A protobuf message as {field number: [values]} (varints as ints, the rest as bytes)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise BundleError(f"unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _block(table: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one table block."""
    if offset + size + 5 > len(table):
        raise BundleError("a block runs past the end of the index")
    if table[offset + size] != 0:
        raise BundleError("compressed table blocks are not supported")
    data = table[offset:offset + size]
    restarts = struct.unpack_from("<I", data, len(data) - 4)[0]
    end = len(data) - 4 - 4 * restarts
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(data, pos)
        unshared, pos = _varint(data, pos)
        value_len, pos = _varint(data, pos)
        key = key[:shared] + data[pos:pos + unshared]
        pos += unshared
        entries.append((key, data[pos:pos + value_len]))
        pos += value_len
    return entries


def read_index(index: bytes) -> tuple[dict, dict[str, dict]]:
    """(header fields, {key: entry}) of a `variables.index` file."""
    if len(index) < 48 or struct.unpack_from("<Q", index, len(index) - 8)[0] != TABLE_MAGIC:
        raise BundleError("not a TensorFlow table (bad magic): is this a SavedModel's variables.index?")
    footer = index[-48:]
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)  # metaindex handle, unused
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    header, entries = {}, {}
    for _, handle in _block(index, index_offset, index_size):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        for key, value in _block(index, offset, size):
            if key == b"":
                header = _fields(value)
                continue
            entries[key.decode()] = _entry(value)
    return header, entries


def _entry(value: bytes) -> dict:
    fields = _fields(value)
    shape = []
    if 2 in fields:
        shape = [_fields(dim).get(1, [0])[0] for dim in _fields(fields[2][0]).get(2, [])]
    return {"dtype": fields.get(1, [0])[0], "shape": tuple(shape), "shard": fields.get(3, [0])[0],
            "offset": fields.get(4, [0])[0], "size": fields.get(5, [0])[0]}


def read_variables(index: bytes, shards: list[bytes]) -> dict[str, np.ndarray]:
    """Every numeric variable of a bundle: {checkpoint key: array}."""
    header, entries = read_index(index)
    count = header.get(1, [1])[0]
    if count != len(shards):
        raise BundleError(f"the bundle has {count} data shards, {len(shards)} given")
    out = {}
    for key, entry in entries.items():
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            continue  # strings and resources: not weights
        raw = shards[entry["shard"]][entry["offset"]:entry["offset"] + entry["size"]]
        array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        expected = int(np.prod(entry["shape"])) if entry["shape"] else 1
        if array.size != expected:
            raise BundleError(f"{key}: {array.size} values for shape {entry['shape']}")
        out[key] = array.reshape(entry["shape"]).copy()
    return out
