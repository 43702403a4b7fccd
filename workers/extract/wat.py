"""Reading a WAT: a stream from a path, http(s):// or s3://, and the JSON payloads of its
metadata records that may hold image links. A cut-off file, a broken tail or a network
failure is told apart and counted, never a crash (tests/workers/extract/test_wat_reading.py).

Records are read in fastwarc's quirks mode, so an excerpt whose headers end in LF instead of
CRLF (what an editor or a copy through a text tool makes of a WAT) is read as the WAT it is.
A file from which no WARC record at all can be read raises NoWarcRecords: its shard fails with
a message naming the file, instead of being marked done with 0 pairs, so fixing the file and
running again does the work."""
from __future__ import annotations

import io
import zlib
from collections import Counter
from typing import Iterator

import fsspec
from celery.exceptions import SoftTimeLimitExceeded

from clipfleet.shared.pipeline import TransientError
from clipfleet.shared.storage import s3_options_from_env


def open_wat(uri: str):
    """A binary stream of the WAT at `uri` (local path, http(s):// or s3://), read as it goes."""
    protocol = fsspec.utils.get_protocol(uri)
    options = {}
    if protocol == "s3":
        options = {**s3_options_from_env(), "default_block_size": 8 * 2**20}
    elif protocol in ("http", "https"):
        options = {"block_size": 0}  # a plain streaming GET, no range requests
    return fsspec.open(uri, "rb", **options)


class _SourceReader(io.RawIOBase):
    """What fastwarc reads through: passes bytes on, keeps the first and the last ones and
    any error of the underlying stream, so a network failure is told apart from bad data."""

    TAIL_BYTES = 4 * 2**20

    def __init__(self, raw):
        self.raw = raw
        self.position = 0
        self.head = b""
        self.tail = bytearray()
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # fastwarc asks where it is; it never seeks
        return self.position

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.raw.read(size)
        except Exception as exc:
            self.error = exc
            raise
        if self.position == 0:
            self.head = data[:16]  # what the file starts with, for messages and the gzip check
        self.position += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.TAIL_BYTES:
            del self.tail[:-self.TAIL_BYTES]
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


GZIP_MAGIC = b"\x1f\x8b\x08"


class NoWarcRecords(ValueError):
    """Not one WARC record could be read from the file: not a WARC/WAT file, or empty."""


def gzip_tail_truncated(tail: bytes) -> bool:
    """True when `tail`, the end of a gzip file, stops inside a gzip member.

    fastwarc reads a cut-off file quietly, so we look at the last member ourselves: from
    the end, find the first offset that starts a member that inflates, and see whether
    the file ends exactly where that member ends.
    """
    start = len(tail)
    while (start := tail.rfind(GZIP_MAGIC, 0, start)) >= 0:
        flags = tail[start + 3] if start + 3 < len(tail) else 0
        if flags & 0xE0:
            continue  # reserved flag bits set: not a member header
        inflater = zlib.decompressobj(31)
        try:
            inflater.decompress(tail[start:])
        except zlib.error:
            continue  # the magic bytes were inside compressed data
        return not inflater.eof or bool(inflater.unused_data)
    return False


def iter_record_payloads(source, stats: Counter) -> Iterator[bytes]:
    """The JSON payloads of a WAT's metadata records that may hold image links.

    Records without an `IMG@` link path cannot yield a pair and are not parsed at all;
    that skips request and warcinfo records and pages without images cheaply.
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    reader = _SourceReader(source)
    # Every type, so a WAT whose first records are not metadata (warcinfo) still counts as read.
    records = ArchiveIterator(reader, parse_http=False, quirks_mode=True)
    count = readable = 0
    try:
        for readable, record in enumerate(records, 1):
            if record.record_type != WarcRecordType.metadata:
                continue
            count += 1
            body = record.reader.read()
            if len(body) < record.content_length:
                stats["truncated_record"] += 1
                continue
            if b"IMG@" in body:
                yield body
    except BaseException as exc:  # fastwarc's Rust panics are BaseExceptions
        if reader.error is not None and not isinstance(reader.error, SoftTimeLimitExceeded):
            raise TransientError(f"reading the WAT failed: {reader.error!r}") from reader.error
        if not isinstance(exc, (OSError, ValueError)) and type(exc).__name__ != "PanicException":
            raise  # a time limit, a shutdown: not a property of the file
        stats["unreadable_tail"] += 1  # the rest of the file cannot be parsed
    finally:
        if count:  # an empty file has no count at all, as every reason that never happened
            stats["records"] += count
    gzipped = reader.head[:2] == GZIP_MAGIC[:2]
    if gzipped and gzip_tail_truncated(bytes(reader.tail)):
        stats["truncated_gzip"] += 1
    if not readable:
        kind = "empty" if reader.position == 0 else (
            f"{reader.position} bytes, " + ("gzip" if gzipped else f"starting {reader.head!r}"))
        raise NoWarcRecords(f"no WARC record could be read ({kind}): not a WARC/WAT file, or cut off "
                            f"before its first record")
