"""Read one downloaded image shard (img2dataset's layout) as a stream of samples.

The parquet (one row per URL, small) is read whole; the tar is read once, front to back, as a
stream (`tarfile` mode "r|"), so a shard on S3 is never downloaded before work starts and
never held in memory. The parquet, not the tar, says which samples exist: a row with status
success whose image is not in the tar (a truncated tar) comes out with `data=None`, so it is
counted instead of silently missing.
"""
from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass
from typing import Iterator

import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.storage import Store

log = logging.getLogger("clipfleet.clip")

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp"}


@dataclass
class Sample:
    key: str
    caption: str | None
    language: str | None
    row: dict                 # the image parquet's row (url, width, original_width, ...)
    data: bytes | None = None  # the stored image; None when the tar does not have it


def read_rows(store: Store, shard: int) -> list[dict]:
    with store.open(layout.image_shard(shard, "parquet")) as f:
        return pq.read_table(f).to_pylist()


def stream_images(store: Store, shard: int) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) in tar order; a tar that breaks off ends the stream with a warning."""
    with store.open(layout.image_shard(shard, "tar")) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.rpartition(".")
                    if ext.lower() not in IMAGE_EXTENSIONS:
                        continue
                    yield key.rsplit("/", 1)[-1], tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            log.warning("image shard %s: tar unreadable past this point: %s", shard, exc)


def downloaded_samples(store: Store, shard: int, rows: list[dict]) -> Iterator[Sample]:
    """Every row with status success, in tar order, then those the tar lacks (data None)."""
    wanted = {r["key"]: r for r in rows if r.get("status") == "success"}
    seen = set()
    for key, data in stream_images(store, shard):
        row = wanted.get(key)
        if row is None or key in seen:  # not listed as downloaded, or a repeat: not ours to judge
            continue
        seen.add(key)
        yield _sample(row, data)
    for key in sorted(set(wanted) - seen):
        yield _sample(wanted[key], None)


def _sample(row: dict, data: bytes | None) -> Sample:
    return Sample(row["key"], row.get("caption"), row.get("language"), row, data)
