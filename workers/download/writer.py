"""Write one downloaded shard in img2dataset's webdataset layout: NNNNN.tar, .parquet, _stats.json.

Samples finish in any order; the tar is written in key order as they come (one that arrives
before its predecessors waits in memory up to a bound, then in a spool file), and the parquet at the end, so a shard
downloaded twice from the same web is the same shard (same members, same bytes, same rows).
"""
from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.shared.layout import IMAGE_EXTRA_FIELDS
from clipfleet.shared.storage import shard_name

# img2dataset's columns after the input columns, in its order (compute_hash="sha256").
RESULT_FIELDS = [("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()),
                 ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
                 ("original_height", pa.int32()), ("sha256", pa.string())]
# A fixed member mtime makes the tar reproducible (webdataset's writer stamps the time).
TAR_MTIME = 0
RECORD_SIZE = 10240  # tar's blocking: archives are whole records of 20 blocks
# Out-of-order images held in memory before further ones go to the spool file: a few seconds
# of a process's output, so the common short wait costs no file writes and reads.
MEMORY_BOUND = 32 * 1024 * 1024
# The tar's write buffer: members are copied into it once and it is written 1 MiB at a time.
# A write per member (the default 8 KiB buffer) cost ~15 us each on the CPU thread, and
# growing a bytearray to 1 MiB and clearing it cost ~24 us a sample in reallocations.
WRITE_BUFFER = 1024 * 1024
PADDING = bytes(512)


def sample_key(index: int, shard: int, shard_size: int) -> str:
    """img2dataset's key: the shard id, then the index within the shard in as many digits as
    the shard size needs, zero-padded to 5 + those digits (its oom_shard_count is 5)."""
    digits = math.ceil(math.log10(max(shard_size, 2)))
    return f"{shard * 10 ** digits + index:0{5 + digits}d}"


def _ustar_template() -> bytes:
    """A POSIX ustar header for a read-only regular file, fixed mtime, no owner; name and size empty."""
    header = bytearray(512)
    header[100:108] = b"0000444\0"                     # mode
    header[108:116] = header[116:124] = b"0000000\0"   # uid, gid
    header[136:148] = b"%011o\0" % TAR_MTIME
    header[148:156] = b" " * 8                         # checksum, counted as spaces
    header[156:157] = b"0"                             # regular file
    header[257:265] = b"ustar\x0000"                   # magic and version
    header[329:337] = header[337:345] = b"0000000\0"   # device numbers
    return bytes(header)


_USTAR_TEMPLATE = _ustar_template()
_USTAR_TEMPLATE_SUM = sum(_USTAR_TEMPLATE)


def tar_header(name: str, size: int) -> bytes:
    """The member's header: the template with its name, size and checksum filled in.

    Built here because tarfile spends ~40 us a member in Python on the same bytes; the
    checksum adds the name's and size's bytes to the template's sum instead of summing 512."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"tar member name over 100 bytes: {name!r}")
    size_field = b"%011o\0" % size
    header = bytearray(_USTAR_TEMPLATE)
    header[0:len(encoded)] = encoded
    header[124:136] = size_field
    header[148:156] = b"%06o\0 " % (_USTAR_TEMPLATE_SUM + sum(encoded) + sum(size_field))
    return header


class ShardWriter:
    """Takes samples in any order, writes the tar in key order as soon as it can.

    A sample that comes before its predecessors waits in memory while the waiting bytes stay
    under `memory_bound`, past it in a spool file, so a slow URL early in the shard costs
    disk, not unbounded RAM."""

    def __init__(self, out_dir: Path, shard: int, input_schema: pa.Schema, encode_format: str,
                 memory_bound: int = MEMORY_BOUND):
        self.out_dir = out_dir
        self.name = shard_name(shard)
        self.encode_format = encode_format
        self.schema = pa.schema(list(input_schema) + [pa.field(n, t) for n, t in RESULT_FIELDS + IMAGE_EXTRA_FIELDS
                                                      if n not in input_schema.names])
        self.tar_path = out_dir / f"{self.name}.tar"
        self.tar = open(self.tar_path, "wb", buffering=WRITE_BUFFER)
        self.tar_size = 0
        self.spool = None  # opened when memory_bound is first passed
        self.memory_bound = memory_bound
        self.in_memory = 0  # bytes of waiting images held in memory
        self.rows: dict[int, dict] = {}
        # index -> the image, its (offset, length) in the spool, or None for no image
        self.waiting: dict[int, bytes | tuple[int, int] | None] = {}
        self.next_index = 0
        self.status_counter: Counter = Counter()  # img2dataset's status_dict: success or the error

    def add(self, index: int, meta: dict, image: bytes | None) -> None:
        """One sample's row (input columns + result fields) and its encoded image, if any."""
        self.rows[index] = meta
        self.status_counter[meta["status"] if meta["status"] == "success" else meta["error_message"]] += 1
        if index == self.next_index:
            self._write_sample(index, image)
            self.next_index += 1
            self._write_waiting()
        elif image is None:
            self.waiting[index] = None
        elif self.in_memory + len(image) <= self.memory_bound:
            self.waiting[index] = image
            self.in_memory += len(image)
        else:
            if self.spool is None:
                self.spool = open(self.out_dir / f"{self.name}.spool", "w+b")
            self.spool.seek(0, io.SEEK_END)
            self.waiting[index] = (self.spool.tell(), len(image))
            self.spool.write(image)

    def _write_waiting(self) -> None:
        while self.next_index in self.waiting:
            place = self.waiting.pop(self.next_index)
            image = place
            if isinstance(place, tuple):
                self.spool.seek(place[0])
                image = self.spool.read(place[1])
            elif place is not None:
                self.in_memory -= len(place)
            self._write_sample(self.next_index, image)
            self.next_index += 1

    def _write_sample(self, index: int, image: bytes | None) -> None:
        if image is None:
            return
        meta = self.rows[index]
        caption = meta.get("caption")
        members = {self.encode_format: image, "json": json.dumps(meta).encode(),
                   "txt": ("" if caption is None else str(caption)).encode()}
        for ext in sorted(members):  # webdataset's layout: KEY.<ext>, a sample's members together
            data = members[ext]
            pad = -len(data) % 512
            self.tar.write(tar_header(f"{meta['key']}.{ext}", len(data)))
            self.tar.write(data)
            self.tar.write(PADDING[:pad])
            self.tar_size += 512 + len(data) + pad

    def close(self, stats: dict) -> dict[str, Path]:
        """Write the three files; returns store-relative name -> local path."""
        self._write_waiting()
        if self.waiting:
            raise RuntimeError(f"shard {self.name}: samples {sorted(self.waiting)[:5]} came without their predecessors")
        end = 1024 + (-(self.tar_size + 1024) % RECORD_SIZE)  # two zero blocks, whole records
        self.tar.write(b"\0" * end)
        self.tar.close()
        if self.spool is not None:
            self.spool.close()
            (self.out_dir / f"{self.name}.spool").unlink()

        ordered = [self.rows[i] for i in sorted(self.rows)]
        parquet_path = self.out_dir / f"{self.name}.parquet"
        table = pa.Table.from_pylist(ordered, schema=self.schema)
        pq.write_table(table, parquet_path)

        stats_path = self.out_dir / f"{self.name}_stats.json"
        stats_path.write_text(json.dumps({**stats, "status_dict": dict(self.status_counter)}, indent=4))
        return {f"images/{self.name}.tar": self.tar_path, f"images/{self.name}.parquet": parquet_path,
                f"images/{self.name}_stats.json": stats_path}
