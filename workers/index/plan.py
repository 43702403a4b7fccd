"""Where a run's index stands, read from the store alone (markers and index/infos.json; no faiss),
so the index tasks decide what is due and the producer can tell when the index is settled.

- trained: the train task's marker exists (it holds the key, dim, whether the index is IVF).
- a shard is *ready* to merge when its index marker says it was added, or, for a shard marked
  while the index was untrained, once the train task committed its partial (an index-part marker).
- settled: every expected index shard is done, all of them are ready, and index/infos.json holds
  exactly the ready shards that have vectors; `clipfleet run` waits for this (the index spec's
  `settled`, read by shared/runstate.RunState.settled), since the merge is not a shard; and the
  near-duplicate groups of that serving generation are published (dedup/info.json names it).
"""
from __future__ import annotations

from clipfleet.shared import layout
from clipfleet.shared.runstate import RunState
from clipfleet.shared.storage import DEADLETTER, Store
from clipfleet.workers.index import vectors

TRAIN = "index-train"
TRAIN_KEY = "train"
PART_MARKERS = "index-part"   # partials the train task built for shards that waited for it
DEDUP = "index-dedup"         # near-duplicate groups of a serving generation (workers/index/dedup.py)
DEDUP_GROUPS, DEDUP_INFO = layout.DEDUP_GROUPS, layout.DEDUP_INFO


def trained(run: RunState) -> dict | None:
    return run.marker(TRAIN, TRAIN_KEY)


def embedded_counts(run: RunState) -> dict[int, int]:
    """Shard -> vectors, from the embed stage's markers (samples it kept)."""
    out = {}
    for name in sorted(run.done("embed")):
        n = (run.marker("embed", name) or {}).get("samples_out")
        if n is None:  # an embed marker without the count: the array's header says it
            n = len(vectors.load(run.store, int(name)))
        out[int(name)] = int(n)
    return out


def waiting(run: RunState, name: str) -> bool:
    return bool(((run.marker("index", name) or {}).get("stats") or {}).get("waiting_for_training"))


def indexed_shards(run: RunState, done: set[str]) -> tuple[list[int], bool]:
    """(shards with vectors ready to merge, whether every done shard is ready)."""
    ready, all_ready = [], True
    for name in sorted(done):
        if waiting(run, name):
            part = run.marker(PART_MARKERS, name)
            if part is None:
                # not added yet, unless adding it failed for good (dead-lettered): merged without it
                all_ready = all_ready and run.store.exists(f"{DEADLETTER}/{PART_MARKERS}/{name}.json")
                continue
            n = part["stats"].get("vectors", 0)
        else:
            n = ((run.marker("index", name) or {}).get("stats") or {}).get("vectors", 0)
        if n:
            ready.append(int(name))
    return ready, all_ready


def read_infos(store: Store, modality: str = "image") -> dict | None:
    try:
        return store.read_json(layout.index_infos(modality))
    except FileNotFoundError:
        return None


def dedup_key(store: Store) -> str | None:
    """The near-duplicate task's key: the serving generation its groups are of (None before a merge)."""
    infos = read_infos(store)
    return None if infos is None else f"g{infos['generation']:05d}"


def dedup_done(store: Store) -> bool:
    try:
        return store.read_json(DEDUP_INFO).get("key") == dedup_key(store)
    except FileNotFoundError:
        return False


def settled(store: Store, run: RunState | None = None) -> bool:
    """Nothing left for the index tasks: every shard indexed and merged into the serving index,
    and that index's near-duplicate groups published."""
    run = run or RunState(store)
    state = run.stage("index")
    if not state.complete:
        return False
    shards, all_ready = indexed_shards(run, state.done)
    infos = read_infos(store)
    return all_ready and infos is not None and sorted(infos.get("shards", [])) == shards and dedup_done(store)
