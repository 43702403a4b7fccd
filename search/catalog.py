"""Per-sample metadata for search, memory-mapped: built once from the run's parquet files.

The build joins each shard's embeddings/metadata/metadata_{shard}.parquet with its
tags/{shard}.parquet (rows aligned) and writes, in a local cache directory:
  catalog.arrow   an uncompressed Arrow IPC file, one record batch per shard, in shard order
  shards.npy      the shard id of each batch (the shard -> batch table; rows are batch rows)
  aesthetic.npz   the mean image embedding of the samples at each aesthetic rating 0..9
  manifest.json   what it was built from (file names, sizes, times), to know when to rebuild
A global id is shard << 20 | row (shared/layout.py), so a lookup is: the batch of the shard
(a binary search in shards.npy), then its rows. A query reads, for each result it returns, one
row of the columns it returns, and for each candidate the filters look at, the few filter
columns; for near-duplicate removal, one embedding row (2 * dim bytes) from the run's
memory-mapped img_emb .npy. Nothing is loaded whole into memory: the OS pages in what is read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.storage import Store

log = logging.getLogger("clipfleet.search")

METADATA_DIR = f"{layout.EMBEDDINGS}/metadata"
TAGS_DIR = "tags"
RATINGS = 10  # clip back's aesthetic ratings 0..9
# Metadata as the service returns it. The CLIP filter's image-text similarity is renamed, since
# a search result's "similarity" is its similarity to the query (as in clip back).
BASE_FIELDS = [("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
               ("clip_similarity", pa.float32()), ("language", pa.string()),
               ("width", pa.int32()), ("height", pa.int32())]
FILTER_TAGS = ("punsafe", "pwatermark", "aesthetic")
FORMAT = 1


def default_cache_root() -> Path:
    state = os.environ.get("CLIPFLEET_STATE_DIR")
    return Path(state) / "search" if state else Path.home() / ".cache" / "clipfleet" / "search"


def cache_dir_for(store: Store, cache_root: str | None = None) -> Path:
    digest = hashlib.sha1(store.uri.encode()).hexdigest()[:16]
    return Path(cache_root) if cache_root else default_cache_root() / digest


def _shard_of(name: str, prefix: str) -> int | None:
    stem = name[len(prefix):-len(".parquet")] if name.startswith(prefix) and name.endswith(".parquet") else ""
    return int(stem) if stem.isdigit() else None


def _listing(store: Store, rel: str, prefix: str) -> dict[int, dict]:
    """shard -> {name, size, mtime} of the parquet files under `rel`."""
    try:
        entries = store.fs.ls(store.path(rel), detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    out = {}
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        shard = _shard_of(name, prefix)
        if shard is not None:
            stamp = entry.get("mtime") or entry.get("LastModified") or entry.get("ETag") or ""
            out[shard] = {"name": name, "size": int(entry.get("size") or 0), "stamp": str(stamp)}
    return out


def source_manifest(store: Store) -> dict:
    meta = _listing(store, METADATA_DIR, "metadata_")
    tags = _listing(store, TAGS_DIR, "")
    return {"format": FORMAT, "store": store.uri,
            "shards": {str(s): {"metadata": meta[s], "tags": tags.get(s)} for s in sorted(meta)}}


class CatalogError(RuntimeError):
    """The run's metadata cannot be served (none yet, or malformed)."""


def ensure_catalog(store: Store, cache: Path) -> Path:
    """Build the catalog in `cache` unless it is already built from the same files."""
    manifest = source_manifest(store)
    if not manifest["shards"]:
        raise CatalogError(f"{store.uri} has no {METADATA_DIR}/metadata_*.parquet yet: embed the run first")
    done = cache / "manifest.json"
    if done.is_file() and json.loads(done.read_text()) == manifest:
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        _build(store, manifest, Path(tmp))
        for name in ("catalog.arrow", "shards.npy", "aesthetic.npz", "embeddings"):
            target = cache / name
            if target.is_dir():
                shutil.rmtree(target)
            if (Path(tmp) / name).exists():
                os.replace(Path(tmp) / name, target)
        (cache / "manifest.json").write_text(json.dumps(manifest))
    return cache


def _tag_fields(store: Store, manifest: dict) -> list[tuple[str, pa.DataType]]:
    """Every tag column any shard has (float32), the filter tags always among them."""
    names = list(FILTER_TAGS)
    for entry in manifest["shards"].values():
        if entry["tags"]:
            for field in pq.read_schema(store.open(f"{TAGS_DIR}/{entry['tags']['name']}")):
                if field.name != "key" and field.name not in names and pa.types.is_floating(field.type):
                    names.append(field.name)
    return [(name, pa.float32()) for name in names]


def _shard_batch(store: Store, shard: int, entry: dict, schema: pa.Schema) -> pa.RecordBatch:
    meta = pq.read_table(store.open(f"{METADATA_DIR}/{entry['metadata']['name']}"))
    n = meta.num_rows
    columns = {}
    for name, kind in BASE_FIELDS:
        source = "similarity" if name == "clip_similarity" else name
        columns[name] = (meta[source].cast(kind) if source in meta.column_names
                         else pa.nulls(n, kind))
    tags = pq.read_table(store.open(f"{TAGS_DIR}/{entry['tags']['name']}")) if entry["tags"] else None
    if tags is not None and tags.num_rows != n:
        log.warning("shard %s: tags have %d rows but metadata %d; its tags are left out", shard,
                    tags.num_rows, n)
        tags = None
    for name, kind in zip(schema.names, schema.types):
        if name not in columns:
            columns[name] = (tags[name].cast(kind) if tags is not None and name in tags.column_names
                             else pa.nulls(n, kind))
    return pa.RecordBatch.from_arrays([pa.concat_arrays(columns[f.name].chunks)
                                       if isinstance(columns[f.name], pa.ChunkedArray) else columns[f.name]
                                       for f in schema], schema=schema)


def _build(store: Store, manifest: dict, out: Path) -> None:
    from tqdm import tqdm
    schema = pa.schema(BASE_FIELDS + _tag_fields(store, manifest))
    shards = sorted(int(s) for s in manifest["shards"])
    sums, counts = None, np.zeros(RATINGS, np.int64)
    with pa.OSFile(str(out / "catalog.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, schema) as writer:
        for shard in tqdm(shards, desc="search metadata", unit="shard", disable=None):
            batch = _shard_batch(store, shard, manifest["shards"][str(shard)], schema)
            writer.write_batch(batch)
            emb = _embedding_file(store, shard, out)
            if emb is None:
                continue
            vectors = np.load(emb, mmap_mode="r")
            if len(vectors) != batch.num_rows:
                raise CatalogError(f"shard {shard}: {len(vectors)} embeddings but {batch.num_rows} metadata rows")
            scores = batch.column("aesthetic").to_numpy(zero_copy_only=False)
            rated = ~np.isnan(scores)
            if rated.any():
                ratings = np.clip(np.rint(scores[rated]), 0, RATINGS - 1).astype(int)
                if sums is None:
                    sums = np.zeros((RATINGS, vectors.shape[1]), np.float64)
                np.add.at(sums, ratings, np.asarray(vectors[rated], np.float64))
                counts += np.bincount(ratings, minlength=RATINGS)
    np.save(out / "shards.npy", np.asarray(shards, np.int64))
    means = np.zeros((RATINGS, 0 if sums is None else sums.shape[1]), np.float32)
    if sums is not None:
        means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    np.savez(out / "aesthetic.npz", means=means, counts=counts)


def _embedding_file(store: Store, shard: int, out: Path) -> str | None:
    """The shard's image embeddings as a local .npy (copied into the cache from a remote store)."""
    rel = layout.image_embeddings(shard)
    if store.local:
        path = store.path(rel)
        return path if os.path.isfile(path) else None
    if not store.exists(rel):
        return None
    target = out / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    store.fs.get_file(store.path(rel), str(target))
    return str(target)


class Catalog:
    """Read side of the cache: rows and embeddings by global id, memory-mapped."""

    def __init__(self, store: Store, cache: Path):
        self.store, self.cache = store, cache
        self._source = pa.memory_map(str(cache / "catalog.arrow"), "r")
        self._reader = pa.ipc.open_file(self._source)
        self.schema = self._reader.schema
        self.shards = np.load(cache / "shards.npy")
        self._batches = [self._reader.get_batch(i) for i in range(self._reader.num_record_batches)]
        self._embeddings: dict[int, np.ndarray | None] = {}
        with np.load(cache / "aesthetic.npz") as packed:
            self.aesthetic_means, self.aesthetic_counts = packed["means"], packed["counts"]
        self.tag_columns = [f.name for f in self.schema if f.name not in dict(BASE_FIELDS)]
        # A filter is honoured only when some sample has the tag.
        self.has = {name: any(b.column(name).null_count < b.num_rows for b in self._batches)
                    for name in self.tag_columns}

    def __len__(self) -> int:
        return sum(b.num_rows for b in self._batches)

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(batch index or -1, row) for each global id."""
        ids = np.asarray(ids, np.int64)
        shard, row = ids >> layout.ROW_BITS, ids & ((1 << layout.ROW_BITS) - 1)
        pos = np.searchsorted(self.shards, shard)
        found = (pos < len(self.shards)) & (ids >= 0)
        found[found] &= self.shards[pos[found]] == shard[found]
        batch = np.where(found, pos, -1)
        sizes = np.array([b.num_rows for b in self._batches] + [0], np.int64)
        batch[row >= sizes[batch]] = -1
        return batch, row

    def take(self, ids, columns: list[str] | None = None) -> pa.Table:
        """The rows of `ids` in their order (all nulls for an id the catalog lacks)."""
        columns = columns or self.schema.names
        schema = pa.schema([self.schema.field(c) for c in columns])
        batch, row = self._locate(ids)
        parts, order = [], []
        for b in np.unique(batch):
            where = np.nonzero(batch == b)[0]
            if b < 0:
                parts.append(pa.table({c: pa.nulls(len(where), schema.field(c).type) for c in columns}, schema=schema))
            else:
                rb = self._batches[b]
                parts.append(pa.Table.from_batches([rb.select(columns).take(pa.array(row[where]))], schema=schema))
            order.append(where)
        if not parts:
            return schema.empty_table()
        table = pa.concat_tables(parts)
        inverse = np.empty(len(batch), np.int64)
        inverse[np.concatenate(order)] = np.arange(len(batch))
        return table.take(pa.array(inverse))

    def rows(self, ids) -> list[dict | None]:
        """Each id's row as a dict (NaN as None), None for an id the catalog lacks. Column by
        column per shard: a result page is a few dozen rows, and this is most of its cost."""
        batch, row = self._locate(ids)
        out: list[dict | None] = [None] * len(batch)
        names = self.schema.names
        for b in np.unique(batch):
            if b < 0:
                continue
            where = np.nonzero(batch == b)[0]
            part = self._batches[b].take(pa.array(row[where]))
            columns = [_python_values(col) for col in part.columns]
            for pos, values in zip(where.tolist(), zip(*columns)):
                out[pos] = dict(zip(names, values))
        return out

    def column(self, ids, name: str) -> np.ndarray:
        """One numeric column for `ids` as float64 (NaN where null)."""
        values = self.take(ids, [name]).column(0)
        return pc.fill_null(values.cast(pa.float64()), float("nan")).to_numpy()

    def embeddings(self, ids) -> np.ndarray | None:
        """Image embeddings (float32) of `ids`, or None when a shard's embeddings are missing."""
        batch, row = self._locate(ids)
        if (batch < 0).any():
            return None
        out = None
        for b in np.unique(batch):
            vectors = self._shard_embeddings(int(self.shards[b]))
            if vectors is None:
                return None
            where = np.nonzero(batch == b)[0]
            if out is None:
                out = np.empty((len(batch), vectors.shape[1]), np.float32)
            out[where] = vectors[row[where]]
        return out if out is not None else np.zeros((0, 0), np.float32)

    def _shard_embeddings(self, shard: int) -> np.ndarray | None:
        if shard not in self._embeddings:
            rel = layout.image_embeddings(shard)
            path = self.store.path(rel) if self.store.local else str(self.cache / rel)
            self._embeddings[shard] = np.load(path, mmap_mode="r") if os.path.isfile(path) else None
        return self._embeddings[shard]


def _python_values(col: pa.Array) -> list:
    """A column as Python values, nulls and NaN as None; through numpy, since pyarrow's
    to_pylist builds a scalar object per value (several times slower at this size)."""
    if pa.types.is_floating(col.type):
        return [None if v != v else v for v in col.to_numpy(zero_copy_only=False).tolist()]
    if pa.types.is_integer(col.type) and col.null_count:
        return col.to_pylist()
    return col.to_numpy(zero_copy_only=False).tolist()
