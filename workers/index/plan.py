"""Where a run's index stands, read from the store alone (markers and index/infos.json; no faiss),
so the index tasks decide what is due and the producer can tell when the index is settled.

- trained: the train task's marker exists (it holds the key, dim, whether the index is IVF).
- a shard is *ready* to merge when its index marker says it was added, or, for a shard marked
  while the index was untrained, once the train task committed its partial (an index-part marker).
- settled: every expected index shard is done, all of them are ready, and index/infos.json holds
  exactly the ready shards that have vectors; `clipfleet run` waits for this (see shared/pipeline.py
  `run_once_settled`), since the merge is not a shard and no shard marker says it is done.
"""
from __future__ import annotations

from clipfleet.shared import layout
from clipfleet.shared.pipeline import shard_state
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import DEADLETTER, Store
from clipfleet.workers.index import vectors

TRAIN = "index-train"
TRAIN_KEY = "train"
PART_MARKERS = "index-part"   # partials the train task built for shards that waited for it


class _Markers:
    """Markers never change once written: read each one once per process."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, store: Store, stage: str, name: str) -> dict | None:
        key = (store.uri, stage, name)
        if key not in self._cache:
            marker = store.marker(stage, name)
            if marker is None:
                return None
            self._cache[key] = marker
        return self._cache[key]


_markers = _Markers()


def trained(store: Store) -> dict | None:
    return _markers.get(store, TRAIN, TRAIN_KEY)


def embedded_counts(store: Store) -> dict[int, int]:
    """Shard -> vectors, from the embed stage's markers (its "vectors" count)."""
    out = {}
    for name in sorted(store.done("embed")):
        marker = _markers.get(store, "embed", name) or {}
        n = (marker.get("stats") or {}).get("vectors")
        if n is None:  # an embed marker without the count: the array's header says it
            n = len(vectors.load(store, int(name)))
        out[int(name)] = int(n)
    return out


def waiting(store: Store, name: str) -> bool:
    marker = _markers.get(store, "index", name) or {}
    return bool((marker.get("stats") or {}).get("waiting_for_training"))


def indexed_shards(store: Store, done: set[str]) -> tuple[list[int], bool]:
    """(shards with vectors ready to merge, whether every done shard is ready)."""
    ready, all_ready = [], True
    for name in sorted(done):
        if waiting(store, name):
            part = _markers.get(store, PART_MARKERS, name)
            if part is None:
                # not added yet, unless adding it failed for good (dead-lettered): merged without it
                all_ready = all_ready and store.exists(f"{DEADLETTER}/{PART_MARKERS}/{name}.json")
                continue
            n = part["stats"].get("vectors", 0)
        else:
            n = ((_markers.get(store, "index", name) or {}).get("stats") or {}).get("vectors", 0)
        if n:
            ready.append(int(name))
    return ready, all_ready


def read_infos(store: Store, modality: str = "image") -> dict | None:
    try:
        return store.read_json(layout.index_infos(modality))
    except FileNotFoundError:
        return None


def settled(store: Store, cfg: RunConfig | None = None) -> bool:
    """Nothing left for the index tasks: every shard indexed and merged into the serving index."""
    state = shard_state(store, "index", cfg)
    if not state.complete:
        return False
    shards, all_ready = indexed_shards(store, state.done)
    infos = read_infos(store)
    return all_ready and infos is not None and sorted(infos.get("shards", [])) == shards
