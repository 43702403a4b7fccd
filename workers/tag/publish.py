"""The published shard: dataset/{shard}.parquet and .tar, kept samples only, in LAION's columns.

The parquet has LAION-5B's column names (URL, TEXT, WIDTH, HEIGHT, LANGUAGE, similarity, punsafe,
pwatermark, aesthetic, hash) plus our key and any user tag columns; the tar is webdataset's
layout (KEY.jpg|png|webp, KEY.txt, KEY.json with the same fields), so webdataset, img2dataset
(parquet input with --url_col URL --caption_col TEXT) and open_clip's loader read it as it is.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import mmh3
import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.storage import Store, shard_name

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def laion_hash(url: str, text: str) -> int:
    """LAION's `hash`: MurmurHash3 x64 128 (seed 0) of URL+TEXT, its first signed 64 bits."""
    return mmh3.hash64((url or "") + (text or ""))[0]


def read_images(store: Store, shard: int, keys: set[str]) -> dict[str, tuple[str, bytes]]:
    """key -> (extension, bytes) of the images of `keys` in images/{shard}.tar, read as a stream."""
    found = {}
    with store.open(layout.image_shard(shard)) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            if key in keys and ext in IMAGE_EXTENSIONS:
                found[key] = (ext, tar.extractfile(member).read())
    return found


def dataset_table(meta: pa.Table, tags: pa.Table) -> pa.Table:
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
    order = [c for c in layout.DATASET_COLUMNS if c in columns]
    order += [c for c in columns if c not in order]  # user tag columns after LAION's
    return pa.table({c: columns[c] for c in order})


def _json_value(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed: the same shard, the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_dataset(meta: pa.Table, tags: pa.Table, images: dict, out: Path, shard: int, stats) -> dict:
    """Write the published parquet and tar into `out`; returns {store path: local file}."""
    table = dataset_table(meta, tags)
    name = shard_name(shard)
    parquet_path, tar_path = out / f"dataset_{name}.parquet", out / f"dataset_{name}.tar"
    pq.write_table(table, parquet_path)
    rows = table.to_pylist()
    in_tar = 0
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row in sorted(rows, key=lambda r: r["key"]):
            image = images.get(row["key"])
            if image is None:
                continue  # still in the parquet; counted under unpublished_images
            record = {k: _json_value(v) for k, v in row.items()}
            members = {image[0]: image[1], "json": json.dumps(record, ensure_ascii=False).encode(),
                       "txt": (row["TEXT"] or "").encode()}
            for ext in sorted(members):  # a sample's members together, as webdataset groups them
                _add(tar, f"{row['key']}.{ext}", members[ext])
            in_tar += 1
    stats.add("published", len(rows))
    stats.add("published_with_image", in_tar)
    return {layout.dataset_shard(shard, "parquet"): parquet_path, layout.dataset_shard(shard, "tar"): tar_path}


__all__ = ["laion_hash", "read_images", "dataset_table", "write_dataset"]
