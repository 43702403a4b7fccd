"""index-dedup: near-duplicate groups across the whole run (workers/index/neardup.py says how), a
run-once task on the index queue due after each merge (its key is the serving generation's).

It first marks the published dataset: each dataset/{shard}.parquet gets `duplicate_of` (and the
sample's KEY.json in the shard's tar), or, with --drop-near-duplicates, loses the duplicates' rows
and their tar members (and gets back, from the stages' outputs, those an earlier generation dropped
that are no duplicates now); a shard already as wanted is not rewritten. Then it commits
dedup/groups.parquet (one row per sample in a group of two or more: id, key, group = the kept sample's id, duplicate_of = the kept sample's key, null for the kept
one), dedup/info.json (counts, thresholds, the key: the record the index stage's `settled` waits
for) and its marker, in that order. A worker killed anywhere leaves no marker; the redelivered task
computes the same groups from the same inputs and converges on the same files.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.pipeline import RunOnce, StageOutput, Stats
from clipfleet.shared.storage import Store, shard_name
from clipfleet.shared.summaries import compacted
from clipfleet.workers.index import calibration, neardup, vectors
from clipfleet.workers.index.plan import (DEDUP, DEDUP_GROUPS, DEDUP_INFO, TRAIN, TRAIN_KEY, dedup_done, dedup_key,
                                         read_infos)
from clipfleet.workers.index.takedown import (_read_parquet, _without_members, _write_parquet, read_ids,
                                              taken_down)
from clipfleet.workers.tag.publish import json_record, read_tar, tar_end, tar_member

GROUP_SCHEMA = pa.schema([("id", pa.int64()), ("key", pa.string()), ("group", pa.int64()),
                          ("duplicate_of", pa.string())])


def _samples(store: Store, shards: list[int], dim: int | None, scratch: Path):
    """ids, keys, similarity, phash (uint64), whether it has one, and the unit vectors (float16, a
    memory map in `scratch`) of every sample embedded in `shards` that was not taken down. Read a
    shard at a time: what stays in memory is ~50 bytes a sample, never the run's vectors."""
    ids, keys, sims, hashes, has = [], [], [], [], []
    gone = taken_down(store)
    spool, width = scratch / "vectors.f16", dim
    with open(spool, "wb") as out:
        for shard in shards:
            meta = _read_parquet(store, layout.embedding_metadata(shard), ["key", "similarity"])
            x = vectors.load(store, shard, "image", dim)
            if meta is None or len(x) == 0:
                continue
            phashes = {}
            images = _read_parquet(store, layout.image_shard(shard, "parquet"), ["key", "phash"])
            if images is not None and "phash" in images.column_names:
                phashes = dict(zip(images.column("key").to_pylist(), images.column("phash").to_pylist()))
            shard_ids = vectors.ids_of(shard, len(meta))
            alive = ~np.isin(shard_ids, gone)
            k = [key for key, a in zip(meta.column("key").to_pylist(), alive) if a]
            ids.append(shard_ids[alive])
            keys += k
            sims.append(meta.column("similarity").to_numpy(zero_copy_only=False).astype(np.float64)[alive])
            hashes += [int(phashes[key], 16) if phashes.get(key) else 0 for key in k]
            has += [bool(phashes.get(key)) for key in k]
            unit = vectors.as_float32(x, vectors.embeddings_path(shard))[alive]
            unit /= np.linalg.norm(unit, axis=1, keepdims=True).clip(1e-12)
            out.write(unit.astype(np.float16).tobytes())
            width = unit.shape[1]
    if not keys:
        return np.zeros(0, np.int64), [], np.zeros(0), np.zeros(0, np.uint64), np.zeros(0, bool), None
    x = np.memmap(spool, np.float16, "r", shape=(len(keys), width))
    return np.concatenate(ids), keys, np.concatenate(sims), np.array(hashes, np.uint64), np.array(has, bool), x


class _Coarse:
    """The trained IVF index's coarse quantizer, behind the index's own transforms (OPQ, PCA)."""

    def __init__(self, index):
        import faiss
        self.index = index  # owns the quantizer
        pre = faiss.downcast_index(index)
        chain = pre.chain if isinstance(pre, faiss.IndexPreTransform) else None
        self.transforms = [faiss.downcast_VectorTransform(chain.at(i)) for i in range(chain.size())] if chain else []
        self.quantizer = faiss.extract_index_ivf(index).quantizer

    def search(self, x: np.ndarray, k: int):
        for t in self.transforms:
            x = t.apply(x)
        return self.quantizer.search(np.ascontiguousarray(x, np.float32), k)


def _quantizer(store: Store, scratch: Path, ivf: bool):
    """The trained index's coarse quantizer when it is IVF; None lets neardup run k-means."""
    if not ivf or not store.exists(layout.trained_index()):
        return None
    import faiss
    path = scratch / "trained.index"
    path.write_bytes(store.read_bytes(layout.trained_index()))
    return _Coarse(faiss.read_index(str(path)))


def find_groups(store: Store, shards: list[int], options, train_stats: dict, scratch: Path,
                stats: Stats) -> tuple[pa.Table, dict]:
    """(the groups, the thresholds used and how they were chosen)."""
    ids, keys, sims, hashes, has, x = _samples(store, shards, train_stats.get("dim"), scratch)
    stats.samples_in(len(keys))
    if not keys:
        return GROUP_SCHEMA.empty_table(), {}
    assigned = neardup.clusters(x, _quantizer(store, scratch, bool(train_stats.get("ivf"))), options.index_seed)
    thresholds = calibration.calibrate(options, _embed_totals(store, shards), x, assigned, hashes, has)
    by_phash = neardup.phash_pairs(hashes, has, thresholds["hamming"])
    by_embedding = (neardup.semantic_pairs(x, assigned, thresholds["eps"]) if thresholds["eps"] > 0
                    else np.zeros((0, 2), np.int64))
    by_phash, by_embedding, vetoed = calibration.confirmed(by_phash, by_embedding, x, hashes, has, thresholds)
    thresholds.update(vetoed)
    rows, kept = neardup.group(keys, sims, [by_phash, by_embedding])
    stats.add("phash_pairs", len(by_phash))
    stats.add("embedding_pairs", len(by_embedding))
    stats.add("clusters", int(len(np.unique(assigned))))
    table = pa.table({"id": pa.array(ids[rows], pa.int64()), "key": [keys[r] for r in rows],
                      "group": pa.array(ids[kept], pa.int64()),
                      "duplicate_of": [None if r == k else keys[k] for r, k in zip(rows, kept)]},
                     schema=GROUP_SCHEMA)
    return table.sort_by([("group", "ascending"), ("id", "ascending")]), thresholds


def _embed_totals(store: Store, shards: list[int]) -> dict:
    """The embed stage's stats summed over `shards` (its copy-distance histograms among them)."""
    names = {shard_name(s) for s in shards} & store.done("embed")
    return compacted(store, "embed", names, store.marker).totals_of(names)


def counts(groups: pa.Table) -> dict:
    marked = int(groups.column("duplicate_of").null_count)
    return {"groups": marked, "samples": len(groups), "duplicates": len(groups) - marked}


class DedupIndex(RunOnce):
    name = DEDUP
    stage = "index"

    def due(self, store: Store) -> str | None:
        return None if dedup_done(store) else dedup_key(store)

    def run(self, store: Store, key: str, out: Path, stats: Stats, **inputs) -> StageOutput:
        infos = read_infos(store) or {}
        train = (store.marker(TRAIN, TRAIN_KEY) or {}).get("stats", {})
        groups, thresholds = find_groups(store, sorted(infos.get("shards", [])), self.options, train, out, stats)
        found = counts(groups)
        for name, n in found.items():
            stats.add(name, n)
        stats.kept(len(groups))
        # the dataset is marked before the commit: a worker killed here leaves no marker, and the
        # redelivered task computes the same groups and finds those shards already as wanted
        rewritten = mark_dataset(store, groups, self.options.drop_near_duplicates)
        stats.add("shards_rewritten", rewritten)
        record_in_run(store, thresholds)
        path, info = out / "groups.parquet", out / "info.json"
        pq.write_table(groups, path)
        info.write_text(json.dumps({
            "key": key, **found, "hamming": thresholds.get("hamming"), "eps": thresholds.get("eps"),
            "calibration": thresholds,
            "dropped": self.options.drop_near_duplicates, "shards_rewritten": rewritten,
            "pairs": {k: stats.get(f"{k}_pairs") for k in ("phash", "embedding")}}, indent=1, sort_keys=True))
        return StageOutput({DEDUP_GROUPS: path, DEDUP_INFO: info})  # the record last


def record_in_run(store: Store, thresholds: dict) -> None:
    """Add the thresholds in force to run.json as `near_duplicates` (a record for the reader, never
    read back as options: the flags stay as the run was given them)."""
    if not thresholds:
        return
    raw = store.read_json(layout.RUN_FILE)
    if raw.get("near_duplicates") != thresholds:
        store.write_json(layout.RUN_FILE, {**raw, "near_duplicates": thresholds}, strict=True)


def mark_dataset(store: Store, groups: pa.Table, drop: bool) -> int:
    """Give every published shard its `duplicate_of` (or drop the duplicates); returns how many
    shards changed. A shard already as wanted is left alone, so a rerun rewrites nothing."""
    marks = {k: d for k, d in zip(groups.column("key").to_pylist(), groups.column("duplicate_of").to_pylist())
             if d is not None}
    shards = sorted({layout.split_id(i)[0] for i in groups.column("id").to_pylist()}
                    | {int(n) for n in store.done("tag")})
    restored = _restore(store, marks) if drop else set()
    return len(restored | {shard for shard in shards if _mark_shard(store, shard, marks, drop)})


def _restore(store: Store, marks: dict[str, str]) -> set[int]:
    """Drop mode: publish again the samples the groups in force (the last generation's, still
    committed) left out as duplicates that are none now: their group split under new thresholds, or
    the sample kept for it was taken down. Returns the shards rewritten. Idempotent: a sample
    already back is not restored twice."""
    if not store.exists(DEDUP_GROUPS):
        return set()
    from clipfleet.workers.publish.refilter import republish
    before = pq.read_table(io.BytesIO(store.read_bytes(DEDUP_GROUPS)))
    hidden = set(taken_down(store).tolist()) | set(read_ids(store, layout.FILTERED_IDS).tolist())
    back: dict[int, set[str]] = {}
    for gid, key, was in zip(*(before.column(c).to_pylist() for c in ("id", "key", "duplicate_of"))):
        if was is not None and key not in marks and gid not in hidden:
            back.setdefault(layout.split_id(gid)[0], set()).add(key)
    rewritten = set()
    for shard, keys in sorted(back.items()):
        published = set(_read_parquet(store, layout.dataset_shard(shard, "parquet"), ["key"]).column("key").to_pylist())
        embedded = _read_parquet(store, layout.embedding_metadata(shard), ["key"]).column("key").to_pylist()
        if republish(store, shard, [row for row, k in enumerate(embedded) if k in published or k in keys]):
            rewritten.add(shard)
    return rewritten


def remark(store: Store) -> int:
    """Mark the published dataset again from the groups in force (after refilter rewrote shards)."""
    if not store.exists(DEDUP_GROUPS):
        return 0
    from clipfleet.shared.runconfig import RunConfig
    groups = pq.read_table(io.BytesIO(store.read_bytes(DEDUP_GROUPS)))
    return mark_dataset(store, groups, RunConfig.load(store).index.drop_near_duplicates)


def _mark_shard(store: Store, shard: int, marks: dict[str, str], drop: bool) -> bool:
    """The parquet is the shard's commit: its tar is brought in line first, so a worker killed between
    the two leaves a parquet still to do and the redelivery finds the tar already as wanted."""
    rel = layout.dataset_shard(shard, "parquet")
    table = _read_parquet(store, rel)
    if table is None or "key" not in table.column_names:
        return False
    keys = table.column("key").to_pylist()
    column = pa.array([marks.get(k) for k in keys], pa.string())
    wanted = table.drop_columns([c for c in ("duplicate_of",) if c in table.column_names])
    where = layout.DATASET_COLUMNS.index("duplicate_of")
    position = len([c for c in layout.DATASET_COLUMNS[:where] if c in wanted.column_names])
    wanted = wanted.add_column(position, "duplicate_of", column)
    if drop:
        wanted = wanted.filter(pc.is_null(wanted.column("duplicate_of")))
    if wanted.equals(table):
        return False
    tar = layout.dataset_shard(shard, "tar")
    if store.exists(tar):
        data = store.read_bytes(tar)
        if drop:
            changed, dropped = _without_members(data, {k for k in keys if k in marks})
        else:
            changed, dropped = _marked_tar(data, marks, tar)
        if dropped:
            store.write_bytes(tar, changed)
    _write_parquet(store, rel, wanted)
    return True


def _marked_tar(data: bytes, marks: dict[str, str], source: str) -> tuple[bytes, int]:
    """The tar with each sample's KEY.json holding its `duplicate_of` (publish.json_record: only where
    set); and how many json changed."""
    out, size, changed = bytearray(), 0, 0
    for name, body in read_tar(io.BytesIO(data), source):
        key, _, ext = name.rsplit("/", 1)[-1].partition(".")
        if ext == "json":
            record = json.loads(body)
            if record.get("duplicate_of") != marks.get(key):
                body = json.dumps(json_record({**record, "duplicate_of": marks.get(key)}), ensure_ascii=False).encode()
                changed += 1
        member = tar_member(name, body)
        out += member
        size += len(member)
    return bytes(out + tar_end(size)), changed


__all__ = ["DedupIndex", "find_groups", "mark_dataset", "remark", "counts", "GROUP_SCHEMA"]
