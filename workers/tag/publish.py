"""The published shard: dataset/{shard}.parquet and .tar, kept samples only, in LAION's columns.

The parquet has LAION-5B's column names (URL, TEXT, WIDTH, HEIGHT, LANGUAGE, similarity, punsafe,
pwatermark, aesthetic, hash) plus our key, download's `phash` (the picture's perceptual hash, 16 hex
digits), `contaminated` (it matched --decontaminate's set), `duplicate_of` (null here; the index
stage's near-duplicate task fills it) and any user tag columns; the tar is webdataset's layout (KEY.jpg|png|webp, KEY.txt, KEY.json with the same fields), so webdataset, img2dataset
(parquet input with --url_col URL --caption_col TEXT) and open_clip's loader read it as it is.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import mmh3
import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.storage import Store, shard_name
# The download stage's ustar header builder: tarfile costs ~40 us a member in Python, which was
# most of a shard's tagging time; the same goes for reading, hence read_tar below.
from clipfleet.workers.download.writer import RECORD_SIZE, tar_header

# Download's marks on each picture, published as they are: its perceptual hash, and whether it
# matched the run's --decontaminate set (null without one).
MARK_COLUMNS = dict(layout.IMAGE_EXTRA_FIELDS)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
WRITE_BUFFER = 1024 * 1024


class TarError(ValueError):
    """An images tar that is not a tar (bad header checksum, cut short)."""


def _octal(field: bytes) -> int:
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, keyvalue = record.partition(b" ")
        key, _, value = keyvalue.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
    return None


def read_tar(fileobj, source: str = "tar"):
    """(name, bytes) of each regular file of a ustar/GNU/pax tar, read as a stream."""
    long_name, index = None, 0
    while True:
        header = fileobj.read(512)
        if len(header) < 512 or not header.strip(b"\0"):
            return
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as spaces
            raise TarError(f"{source}: member {index} has a bad header checksum: not a tar, or corrupt")
        size, kind = _octal(header[124:136]), header[156:157]
        data = fileobj.read(size)
        if len(data) < size:
            raise TarError(f"{source}: cut short in member {index}")
        fileobj.read(-size % 512)
        index += 1
        if kind == b"L":  # GNU long name: the next member's
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if kind in (b"x", b"g"):
            long_name = _pax_path(data) if kind == b"x" else long_name
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
        name, long_name = long_name or (f"{prefix}/{name}" if prefix else name), None
        if kind in (b"0", b"\0", b"7"):
            yield name, data


def laion_hash(url: str, text: str) -> int:
    """LAION's `hash`: MurmurHash3 x64 128 (seed 0) of URL+TEXT, its first signed 64 bits."""
    return mmh3.hash64((url or "") + (text or ""))[0]


def read_images(store: Store, shard: int, keys: set[str]) -> dict[str, tuple[str, bytes]]:
    """key -> (extension, bytes) of the images of `keys` in images/{shard}.tar, read as a stream."""
    found = {}
    with store.open(layout.image_shard(shard)) as raw:
        for name, data in read_tar(raw, layout.image_shard(shard)):
            key, _, ext = name.rpartition("/")[2].partition(".")
            if key in keys and ext in IMAGE_EXTENSIONS:
                found[key] = (ext, data)
    return found


def image_marks(store: Store, shard: int) -> dict[str, dict]:
    """key -> {"phash", "contaminated"} from images/{shard}.parquet, where download put them."""
    rel = layout.image_shard(shard, "parquet")
    if not store.exists(rel):
        return {}
    with store.open(rel) as f:
        table = pq.read_table(f)
    names = [name for name in MARK_COLUMNS if name in table.column_names]  # none before perceptual hashes
    return {row.pop("key"): row for row in table.select(["key", *names]).to_pylist()}


def dataset_table(meta: pa.Table, tags: pa.Table, marks: dict[str, dict] | None = None) -> pa.Table:
    urls = meta.column("url").to_pylist()
    texts = meta.column("caption").to_pylist()
    columns = {
        "key": meta.column("key").cast(pa.string()),
        "URL": meta.column("url").cast(pa.string()),
        "TEXT": meta.column("caption").cast(pa.string()),
        "WIDTH": meta.column("width").cast(pa.int32()),
        "HEIGHT": meta.column("height").cast(pa.int32()),
        "LANGUAGE": meta.column("language").cast(pa.string()),
        "similarity": meta.column("similarity").cast(pa.float32()),
    }
    for name in tags.column_names[1:]:
        columns[name] = tags.column(name)
    columns["hash"] = pa.array([laion_hash(u, t) for u, t in zip(urls, texts)], pa.int64())
    rows = [(marks or {}).get(k, {}) for k in columns["key"].to_pylist()]
    for name, kind in MARK_COLUMNS.items():
        columns[name] = pa.array([row.get(name) for row in rows], kind)
    columns["duplicate_of"] = pa.nulls(len(rows), pa.string())  # set once the run's groups are known (index-dedup)
    order = [c for c in layout.DATASET_COLUMNS if c in columns]
    order += [c for c in columns if c not in order]  # user tag columns after LAION's
    return pa.table({c: columns[c] for c in order})


def _json_value(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def json_record(row: dict) -> dict:
    """A sample's KEY.json: its parquet row, but `duplicate_of` only where it names a sample.
    Hugging Face's webdataset loader types each field from a tar's first five samples: a
    duplicate_of null in those five typed it null, and the first duplicate after them failed the
    whole load ("Couldn't cast array of type string to null"); a field it did not see is dropped."""
    return {k: _json_value(v) for k, v in row.items() if not (k == "duplicate_of" and v is None)}


def tar_member(name: str, data: bytes) -> bytes:
    """One regular file of a ustar archive: header, data, padding to the block."""
    return tar_header(name, len(data)) + data + b"\0" * (-len(data) % 512)


def tar_end(size: int) -> bytes:
    """What closes an archive of `size` bytes: two zero blocks, then zeros to a whole record."""
    return b"\0" * (1024 + (-(size + 1024) % RECORD_SIZE))


def write_dataset(meta: pa.Table, tags: pa.Table, images: dict, out: Path, shard: int, stats,
                  marks: dict[str, dict] | None = None) -> dict:
    """Write the published parquet and tar into `out`; returns {store path: local file}."""
    table = dataset_table(meta, tags, marks)
    name = shard_name(shard)
    parquet_path, tar_path = out / f"dataset_{name}.parquet", out / f"dataset_{name}.tar"
    pq.write_table(table, parquet_path)
    rows = table.to_pylist()
    in_tar, size, pending = 0, 0, bytearray()
    with open(tar_path, "wb") as tar:
        for row in sorted(rows, key=lambda r: r["key"]):
            image = images.get(row["key"])
            if image is None:
                continue  # still in the parquet; counted under unpublished_images
            record = json_record(row)
            members = {image[0]: image[1], "json": json.dumps(record, ensure_ascii=False).encode(),
                       "txt": (row["TEXT"] or "").encode()}
            for ext in sorted(members):  # a sample's members together, as webdataset groups them
                member = tar_member(f"{row['key']}.{ext}", members[ext])
                pending += member
                size += len(member)
            in_tar += 1
            if len(pending) >= WRITE_BUFFER:
                tar.write(pending)
                pending.clear()
        pending += tar_end(size)
        tar.write(pending)
    stats.add("published", len(rows))
    stats.kept(len(rows))
    stats.add("published_with_image", in_tar)
    return {layout.dataset_shard(shard, "parquet"): parquet_path, layout.dataset_shard(shard, "tar"): tar_path}


__all__ = ["laion_hash", "read_tar", "json_record", "tar_member", "tar_end", "read_images", "dataset_table", "write_dataset", "image_marks", "TarError"]
