"""`clipfleet refilter --store S --keep-top-percent P`: DataComp's CLIP-score filter (keep the top P%
per language bucket) applied to a finished run, across the whole run, without recomputing anything.

The clip stage scored every downloaded sample (clip/{shard}.parquet); per bucket (the clip stage's
own: English, everything else) the judged samples are ranked by similarity (ties by shard and key)
and the first round(n * P / 100) are kept, so the kept share is exact whatever the shards. What is
published is rebuilt from what the run already holds: the embeddings' metadata, the tags and the
downloaded images (workers/tag/publish.py writes each shard as the tag stage did), never with a
model. Samples the percentile keeps but the run's threshold did not embed cannot be published
without embedding them: refilter then stops before writing anything, naming how many.

Exactly once, resumable: the target is a pure function of the scores; a shard is rewritten only
when its published keys differ, then the ids left out go to filtered/ids.npy and the record
filtered/filter.json is written last. Run twice, the second finds nothing to change and writes
nothing; stopped half-way, the next run finishes. Takedowns stay taken down.
"""
from __future__ import annotations

import io
import json
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.pipeline import Stats
from clipfleet.shared.storage import Store
from clipfleet.workers.index.takedown import taken_down, write_ids
from clipfleet.workers.tag.publish import image_marks, read_images, write_dataset


class RefilterError(ValueError):
    """The filter cannot be applied to this run as it is (nothing judged, samples never embedded)."""


def bucket(language: str | None) -> str:
    from clipfleet.workers.clip.stage import bucket as clip_bucket  # the clip stage's buckets, one definition
    return clip_bucket(language)


def _table(store: Store, rel: str, columns=None) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read_bytes(rel)), columns=columns)


def ranked(store: Store) -> dict[str, list[tuple[float, int, str]]]:
    """bucket -> (similarity, shard, key) of every judged sample, best first."""
    out = defaultdict(list)
    for name in sorted(store.done("clip")):
        shard = int(name)
        languages = dict(zip(*_table(store, layout.image_shard(shard, "parquet"), ["key", "language"])
                             .to_pydict().values()))
        judged = _table(store, layout.clip_shard(shard), ["key", "similarity"]).to_pydict()
        for key, similarity in zip(judged["key"], judged["similarity"]):
            if similarity is not None:  # no model could judge it: never kept
                out[bucket(languages.get(key))].append((similarity, shard, key))
    for rows in out.values():
        rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    return dict(out)


def plan(store: Store, percent: float) -> tuple[set[tuple[int, str]], dict]:
    """((shard, key) to keep, per-bucket summary: judged, kept, the lowest kept similarity)."""
    keep, buckets = set(), {}
    for name, rows in sorted(ranked(store).items()):
        n = int(round(len(rows) * percent / 100))
        keep.update((shard, key) for _, shard, key in rows[:n])
        buckets[name] = {"judged": len(rows), "kept": n, "min_similarity": rows[n - 1][0] if n else None}
    if not buckets:
        raise RefilterError(f"{store.uri}: no sample was judged by the clip stage; nothing to filter")
    return keep, buckets


def refilter(store: Store, percent: float | None = None, near_targets: dict | None = None) -> dict:
    """Publish the top `percent`% per bucket, intersected with the samples near `near_targets`
    ({targets: labels, vectors, clusters}: workers/publish/nearfilter.py) when given; returns
    {keep_top_percent, buckets, keep_near?, published, filtered, shards_rewritten, changed}."""
    if percent is None and near_targets is None:
        raise RefilterError("give --keep-top-percent, --keep-near or both")
    if percent is not None and not 0 < percent <= 100:
        raise RefilterError(f"--keep-top-percent must be in (0, 100], not {percent}")
    from clipfleet.shared.runstate import RunState
    tag = RunState(store).stage("tag")
    if not (tag.n_expected and tag.complete):  # a share of part of the run is not the run's share
        raise RefilterError(f"{store.uri}: the run has not published every shard yet ({tag.n_done} of "
                            f"{tag.n_expected} tagged); refilter it once it has")
    keys = {int(name): _table(store, layout.embedding_metadata(int(name)), ["key"]).column("key").to_pylist()
            for name in sorted(store.done("tag"))}
    embedded = {(shard, k) for shard, ks in keys.items() for k in ks}
    keep, buckets = plan(store, percent) if percent is not None else (embedded, None)
    missing = keep - embedded
    if missing:
        raise RefilterError(f"the top {percent}% holds {len(missing)} samples the run never embedded (below its "
                            "--min-similarity thresholds, or in shards not tagged yet): lower the percentage, or "
                            "run with lower thresholds")
    record = {"keep_top_percent": percent, "buckets": buckets}
    if near_targets is not None:  # DataComp-1B: the intersection of both filters
        from clipfleet.workers.publish.nearfilter import near
        rows, summary = near(store, {s: len(ks) for s, ks in keys.items()}, near_targets["vectors"],
                             near_targets["clusters"])
        keep = keep & {(shard, keys[shard][row]) for shard, row in rows}
        record["keep_near"] = {"targets": near_targets["targets"], "target_vectors": len(near_targets["vectors"]),
                               **summary}
    removed = set(taken_down(store).tolist())
    wanted, left_out = {}, []
    for shard, ks in keys.items():
        ids = [layout.global_id(shard, row) for row in range(len(ks))]
        wanted[shard] = [row for row, k in enumerate(ks) if (shard, k) in keep and ids[row] not in removed]
        left_out += [i for row, i in enumerate(ids) if (shard, ks[row]) not in keep]
    rewritten = sum(republish(store, shard, rows) for shard, rows in wanted.items())
    if rewritten:
        from clipfleet.workers.index.dedup import remark
        remark(store)  # a rewritten shard keeps its near-duplicate marks (dedup/groups.parquet)
    ids = np.array(sorted(left_out), np.int64)
    record.update(published=sum(map(len, wanted.values())), filtered=len(ids))
    changed = bool(rewritten) or _differs(store, layout.FILTER_RECORD, record)
    if changed:
        write_ids(store, ids, layout.FILTERED_IDS)
        if near_targets is not None:  # so the filter can be re-applied without the file or the model
            buf = io.BytesIO()
            np.save(buf, near_targets["vectors"].astype(np.float32))
            store.write_bytes(layout.FILTER_TARGETS, buf.getvalue())
        store.write_json(layout.FILTER_RECORD, record)  # last: the filter in force
    return {**record, "shards_rewritten": rewritten, "changed": changed}


def _differs(store: Store, rel: str, record: dict) -> bool:
    try:
        return store.read_json(rel) != json.loads(json.dumps(record))
    except FileNotFoundError:
        return True


def republish(store: Store, shard: int, rows) -> bool:
    """Rewrite dataset/{shard} with `rows` of its embeddings' metadata, as the tag stage writes it;
    False when it already holds exactly those samples."""
    rows = pa.array(rows, pa.int64())  # typed: a shard may keep nothing
    meta = _table(store, layout.embedding_metadata(shard)).take(rows)
    keys = set(meta.column("key").to_pylist())
    current = _table(store, layout.dataset_shard(shard, "parquet"), ["key"]).column("key").to_pylist()
    if set(current) == keys and len(current) == len(keys):
        return False
    tags = _table(store, layout.tag_shard(shard)).take(rows)
    with store.staging() as out:
        files = write_dataset(meta, tags, read_images(store, shard, keys), out, shard, Stats(),
                              image_marks(store, shard))  # phash and contaminated stay published
        for rel, path in sorted(files.items(), key=lambda f: f[0].endswith(".parquet")):  # the parquet last
            store._put(str(path), rel)
    return True


def run_refilter(store_uri: str, percent: float | None, near_values: list[str] | None = None,
                 clusters: int | None = None) -> int:
    store = Store(store_uri)
    if not store.exists(layout.RUN_FILE):
        raise RefilterError(f"{store_uri} holds no run (no run.json)")
    if clusters is not None and (clusters < 1 or not near_values):
        raise RefilterError(f"--clusters goes with --keep-near and must be at least 1, not {clusters}")
    near_targets = None
    if near_values:
        from clipfleet.workers.publish.nearfilter import read_targets
        from clipfleet.shared.runconfig import RunConfig
        labels, vectors = read_targets(near_values, RunConfig.load(store).embed.embed_model, store.uri)
        near_targets = {"targets": labels, "vectors": vectors, "clusters": clusters}
    done = refilter(store, percent, near_targets)
    for name, b in (done["buckets"] or {}).items():
        cutoff = "" if b["min_similarity"] is None else f", similarity >= {b['min_similarity']:.4f}"
        print(f"{name}: kept {b['kept']} of {b['judged']} judged samples{cutoff}")
    if "keep_near" in done:
        n = done["keep_near"]
        print(f"near the targets: {n['near']} of {n['embedded']} embedded samples, in {n['clusters_kept']} of "
              f"{n['clusters']} clusters voted for by {n['target_vectors']} target vectors")
    if not done["changed"]:
        print(f"nothing changed: dataset/ already holds what this filter keeps ({done['published']} samples)")
        return 0
    print(f"published {done['published']} samples; {done['shards_rewritten']} shards rewritten")
    from clipfleet.workers.publish.card import write_card
    card = write_card(store)
    if card:
        print(f"dataset card: {card}")
    return 0


def in_force(store: Store, cfg) -> dict | None:
    """refilter's arguments for the filter a settled run publishes: the last refilter's (its target
    vectors as stored), else the run's --keep-top-percent (so shards a retry adds later are filtered
    as the rest)."""
    if store.exists(layout.FILTER_RECORD):
        record = store.read_json(layout.FILTER_RECORD)
        near = record.get("keep_near")
        if near:
            vectors = np.load(io.BytesIO(store.read_bytes(layout.FILTER_TARGETS)))
            near = {"targets": near["targets"], "vectors": vectors, "clusters": near["clusters"]}
        return {"percent": record["keep_top_percent"], "near_targets": near}
    percent = cfg.clip.keep_top_percent if "tag" in cfg.stages else None
    return {"percent": percent, "near_targets": None} if percent else None
