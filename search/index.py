"""The run's serving index, as the search service sees it: search, ntotal, dim, infos.

Until `clipfleet.workers.index.serving.ServingIndex` (the index stage's reader, which also hides
taken-down ids) exists, this opens index/serving.index (and index/serving_text.index for the
text modality) memory-mapped with faiss itself. Either way the service sees one interface.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from clipfleet.shared.layout import INDEX
from clipfleet.shared.storage import Store

INDEX_FILES = {"image": f"{INDEX}/serving.index", "text": f"{INDEX}/serving_text.index"}
INFOS_FILE = f"{INDEX}/infos.json"


class IndexMissing(LookupError):
    """The run has no index for the asked modality."""


class _FaissFile:
    """A faiss index file, memory-mapped read-only (its pages are read as searches touch them)."""

    def __init__(self, path: str, infos: dict):
        import faiss
        self.index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        self.infos = infos

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), int(k))
        return sims.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


def _local_copy(store: Store, rel: str, cache: Path) -> str:
    """A local path for `rel`: itself on a local store, else a copy in the cache (mmap needs a file)."""
    if store.local:
        return store.path(rel)
    target = cache / rel
    size = store.fs.info(store.path(rel))["size"]
    if not target.is_file() or target.stat().st_size != size:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        store.fs.get_file(store.path(rel), str(tmp))
        os.replace(tmp, target)
    return str(target)


def open_index(store: Store, modality: str, cache: Path):
    """The serving index of `modality` ("image" or "text"); IndexMissing when the run has none."""
    try:
        from clipfleet.workers.index.serving import ServingIndex
    except ImportError:
        ServingIndex = None
    if ServingIndex is not None:
        try:
            return ServingIndex.open(store, modality=modality)
        except FileNotFoundError as exc:
            raise IndexMissing(f"this run has no {modality} index ({exc})") from None
    rel = INDEX_FILES[modality]
    if not store.exists(rel):
        raise IndexMissing(f"this run has no {modality} index ({store.url(rel)} does not exist)")
    infos = store.read_json(INFOS_FILE) if store.exists(INFOS_FILE) else {}
    return _FaissFile(_local_copy(store, rel, cache), infos)


def infos_model(index) -> str | None:
    return (getattr(index, "infos", None) or {}).get("model")
