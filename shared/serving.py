"""The serving index, as search opens it: `ServingIndex.open(store)`, then `.search(queries, k)`.

The index stage writes it (workers/index/), search reads it: the format lives here, between them.
Imports only faiss, numpy, pyarrow and the store layout, so the search service loads no stage.

- `open(store, modality="image")` reads `index/infos.json` (or `index/text/infos.json`), which
  names the current merged index; the index is opened memory-mapped and read-only (on-disk
  inverted lists for IVF, found beside the index file; memory-mapped flat codes for HNSW/Flat).
  On an s3 store the generation's files are copied once into a local cache first.
- `search(queries (n, d) float32, k) -> (similarities (n, k) float32, ids (n, k) int64)` with the
  search parameters infos.json holds. Rows have fewer than k results only when the index has fewer
  searchable vectors: the rest is id -1 with similarity -inf.
- Taken-down ids (`takedowns/ids.npy`, written by `clipfleet takedown`) and the ids `clipfleet
  refilter` left out of dataset/ (`filtered/ids.npy`) are never returned: each
  search asks faiss for k plus as many as may be taken down, drops them, and asks deeper for a row
  that ends up short, so a row still holds k results. The takedown list and infos.json are looked
  at again every `refresh_s` seconds, so a running server follows takedowns and new merges.
- `ntotal`, `dim`, `infos`; `metadata(ids)` reads the rows of embeddings/metadata that ids point at.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from clipfleet.shared.layout import FILTERED_IDS, INDEX_MODALITIES, ROW_BITS, TAKEDOWN_IDS, index_infos

INFOS = {modality: index_infos(modality) for modality in INDEX_MODALITIES}


# Ids never served: taken down, and left out of dataset/ by `clipfleet refilter` (search serves
# what is published).
HIDDEN_IDS = (TAKEDOWN_IDS, FILTERED_IDS)


def read_hidden(store, known_stamp=None):
    """(stamp, sorted ids) of every id never served; ids is None when the stamp did not change."""
    stamp = []
    for rel in HIDDEN_IDS:
        try:
            info = store.fs.info(store.path(rel))
        except FileNotFoundError:
            stamp.append(None)
            continue
        stamp.append((info.get("size"), info.get("mtime") or info.get("LastModified") or info.get("ETag")))
    stamp = tuple(stamp)
    if stamp == known_stamp:
        return stamp, None
    ids = [np.load(io.BytesIO(store.read_bytes(rel))) for rel, s in zip(HIDDEN_IDS, stamp) if s is not None]
    return stamp, np.unique(np.concatenate(ids).astype(np.int64)) if ids else np.zeros(0, np.int64)


class IndexNotBuilt(RuntimeError):
    """The store has no serving index of that modality (yet)."""


def open_index(path, ivf: bool) -> faiss.Index:
    """A merged index, memory-mapped and read-only."""
    if ivf:
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    else:
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    return faiss.read_index(str(path), flags)


@dataclass
class _State:
    infos: dict
    index: faiss.Index | None
    taken_down: np.ndarray      # sorted int64
    takedown_stamp: object


def _cache_root() -> Path:
    base = os.environ.get("CLIPFLEET_CACHE_DIR") or Path.home() / ".cache" / "clipfleet"
    return Path(base) / "serving"


class ServingIndex:
    def __init__(self, store, modality: str, state: _State, refresh_s: float):
        self.store, self.modality, self.refresh_s = store, modality, refresh_s
        self._state = state
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    # -- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, store, modality: str = "image", refresh_s: float = 2.0) -> "ServingIndex":
        if isinstance(store, str):
            from clipfleet.shared.storage import Store
            store = Store(store)
        if modality not in INFOS:
            raise ValueError(f"no {modality!r} index; modalities are {', '.join(INFOS)}")
        infos = cls._read_infos(store, modality)
        stamp, taken_down = cls._read_takedowns(store, None)
        return cls(store, modality, _State(infos, cls._open_generation(store, infos), taken_down, stamp), refresh_s)

    @staticmethod
    def _read_infos(store, modality: str) -> dict:
        try:
            return json.loads(store.read_bytes(INFOS[modality]))
        except FileNotFoundError:
            hint = " (build it with --index-text)" if modality == "text" else ""
            raise IndexNotBuilt(f"{store.uri} has no {modality} index yet: {INFOS[modality]} is missing{hint}") from None

    @staticmethod
    def _open_generation(store, infos: dict) -> faiss.Index | None:
        if not infos.get("index_file"):
            return None  # a run without vectors: searches return nothing
        files = [infos["index_file"]] + ([infos["ivfdata_file"]] if infos.get("ivfdata_file") else [])
        if store.local:
            path = store.path(infos["index_file"])
        else:
            local = _cache_root() / hashlib.sha1(store.uri.encode()).hexdigest()[:16] / f"{infos['generation']:05d}"
            local.mkdir(parents=True, exist_ok=True)
            for rel in files:
                target = local / rel.rsplit("/", 1)[-1]
                if not target.exists() or target.stat().st_size != store.fs.info(store.path(rel))["size"]:
                    tmp = target.with_suffix(target.suffix + ".part")
                    store.fs.get_file(store.path(rel), str(tmp))
                    os.replace(tmp, target)
            path = local / infos["index_file"].rsplit("/", 1)[-1]
        index = open_index(path, ivf=bool(infos.get("ivfdata_file")))
        if infos.get("search_params"):
            faiss.ParameterSpace().set_index_parameters(index, infos["search_params"])
        return index

    @staticmethod
    def _read_takedowns(store, known_stamp):
        return read_hidden(store, known_stamp)

    def refresh(self) -> bool:
        """Pick up a new takedown list or a new merge; True when something changed."""
        with self._lock:
            self._checked = time.monotonic()
            state = self._state
            changed = False
            infos = self._read_infos(self.store, self.modality)
            index = state.index
            if infos.get("generation") != state.infos.get("generation"):
                index, changed = self._open_generation(self.store, infos), True
            stamp, ids = self._read_takedowns(self.store, state.takedown_stamp)
            taken_down = state.taken_down if ids is None else ids
            changed = changed or ids is not None
            if changed:
                self._state = _State(infos, index, taken_down, stamp)  # searches in flight keep the old one
            return changed

    # -- what it holds --------------------------------------------------------------------------
    @property
    def infos(self) -> dict:
        return self._state.infos

    @property
    def dim(self) -> int:
        return int(self._state.infos.get("dim") or 0)

    @property
    def ntotal(self) -> int:
        """Searchable vectors: those in the index less those taken down."""
        state = self._state
        if state.index is None:
            return 0
        shards = np.asarray(state.infos.get("shards", []), np.int64)
        hidden = int(np.isin(state.taken_down >> ROW_BITS, shards).sum()) if len(state.taken_down) else 0
        return int(state.index.ntotal) - hidden

    # -- searching ------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.refresh_s is not None and time.monotonic() - self._checked >= self.refresh_s:
            try:
                self.refresh()
            except Exception:  # the store is away for a moment: keep serving what is open
                self._checked = time.monotonic()
        state = self._state
        queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or (self.dim and queries.shape[1] != self.dim):
            raise ValueError(f"queries must be (n, {self.dim}), got {queries.shape}")
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = len(queries)
        sims = np.full((n, k), -np.inf, np.float32)
        ids = np.full((n, k), -1, np.int64)
        if state.index is None or n == 0:
            return sims, ids
        total = int(state.index.ntotal)
        todo = np.arange(n)
        depth = min(total, k + min(len(state.taken_down), k))
        while len(todo):
            d, i = state.index.search(queries[todo], max(depth, 1))
            keep = i >= 0
            if len(state.taken_down):
                keep &= ~np.isin(i, state.taken_down)
            short = []
            for row, q in enumerate(todo):
                good = np.flatnonzero(keep[row])[:k]
                sims[q, :len(good)], ids[q, :len(good)] = d[row, good], i[row, good]
                exhausted = depth >= total or (i[row] < 0).any()
                if len(good) < k and not exhausted:
                    short.append(q)
            todo, depth = np.asarray(short, dtype=np.int64), min(total, depth * 2)
        return sims, ids

    # -- metadata -------------------------------------------------------------------------------
    def metadata(self, ids, columns=None) -> list[dict | None]:
        """The embeddings/metadata row each id points at (None for -1 or a taken-down id)."""
        import pyarrow.parquet as pq
        ids = np.asarray(ids, np.int64).ravel()
        out: list[dict | None] = [None] * len(ids)
        hidden = set(self._state.taken_down.tolist())
        by_shard: dict[int, list[int]] = {}
        for pos, gid in enumerate(ids.tolist()):
            if gid >= 0 and gid not in hidden:
                by_shard.setdefault(gid >> ROW_BITS, []).append(pos)
        for shard, positions in by_shard.items():
            with self.store.open(f"embeddings/metadata/metadata_{shard:05d}.parquet") as f:
                table = pq.read_table(f, columns=columns)
            rows = [int(ids[p]) & ((1 << ROW_BITS) - 1) for p in positions]
            for p, row in zip(positions, table.take(rows).to_pylist()):
                out[p] = row
        return out
