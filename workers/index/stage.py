"""index-merge: one KNN index per run, trained once on a fair sample, added to shard by shard,
merged into one memory-mapped serving index, with its recall measured.

Three tasks on the index-merge queue (one process: an index is memory bound):

- `index` (per shard, after tag): with a trained index, the shard's vectors become a partial
  index under their global ids (`layout.global_id(shard, row)`, so an id leads to its metadata row
  without any table). Before training the shard is marked as waiting; the train task adds it.
- `index-train` (run once): due when `--index-train-after` vectors are embedded or every shard
  upstream is done, whichever comes first. autofaiss picks the key for the run's expected size and
  `--index-memory`; it is trained on a sample drawn uniformly across every embedded shard (not the
  first N vectors). Its follow-up adds the shards that waited.
- `index-merge` (run once per set of shards): due when every expected shard is indexed. Partials
  are merged (faiss merge_ondisk for IVF) into a new generation under index/serving/, search
  parameters are tuned to `--index-query-ms`, recall and latency are measured on held-out queries,
  and index/infos.json, written last, switches search to it. A shard indexed after a merge makes a
  new set due: it is merged in with the same trained index, never a retraining.

Each task commits through the framework (outputs, then the marker), so a worker killed in any of
them leaves nothing half-visible and the redelivered task redoes it; see shared/pipeline.py for how
run-once tasks stay exactly-once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from clipfleet.shared import layout
from clipfleet.shared.pipeline import RunOnce, Stage, StageOutput, Stats
from clipfleet.shared.runstate import RunState
from clipfleet.shared.storage import Store, shard_name
from clipfleet.workers.index import build, tuning, vectors
from clipfleet.workers.index.plan import (DEDUP, PART_MARKERS, TRAIN, TRAIN_KEY, embedded_counts, indexed_shards,
                                         read_infos, trained, waiting)

log = logging.getLogger("clipfleet.index")



def modalities(options) -> list[str]:
    return ["image", "text"] if options.index_text else ["image"]


def _local(store: Store, rel: str, scratch: Path) -> Path:
    """A local path to a store file: itself on a local store, a copy in `scratch` otherwise."""
    if store.local:
        return Path(store.path(rel))
    target = scratch / rel.replace("/", "__")
    if not target.exists():
        store.fs.get_file(store.path(rel), str(target))
    return target


class _TrainedCache:
    """The trained empty index of a run, copied once per process from a remote store."""

    def __init__(self):
        self._dir = None
        self._paths: dict = {}

    def path(self, store: Store, modality: str, stamp) -> Path:
        key = (store.uri, modality, stamp)
        if key not in self._paths:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="clipfleet-trained-")
            self._paths[key] = _local(store, layout.trained_index(modality), Path(self._dir.name))
        return self._paths[key]


_trained_cache = _TrainedCache()


def add_shard(store: Store, shard: int, modality: str, train_marker: dict, out: Path) -> tuple[int, Path | None]:
    """(vectors, partial index file) of one shard; no file for a non-IVF index, whose merge reads
    the vectors themselves, or for a shard without vectors."""
    dim = train_marker["stats"].get("dim")
    x = vectors.load(store, shard, modality, dim)
    if len(x) == 0 or not train_marker["stats"].get("ivf"):
        vectors.as_float32(x, vectors.embeddings_path(shard, modality))  # bad values fail here, not at merge
        return len(x), None
    trained_path = _trained_cache.path(store, modality, train_marker["finished_at"])
    index = build.partial(trained_path, x, vectors.ids_of(shard, len(x)))
    path = out / f"{modality}-{shard_name(shard)}.index"
    build.write(index, path)
    return len(x), path


class _Index:
    def state(self, store: Store) -> RunState:
        # with the Redis run index when the Celery glue set one; a direct `execute` reads the store
        return RunState(store, self.run_config, index=self.run_index)


class IndexStage(_Index, Stage):
    name = "index"

    def run(self, store: Store, shard: int, out: Path, stats: Stats, **inputs) -> StageOutput:
        train_marker = trained(self.state(store))
        files = {}
        for modality in modalities(self.options):
            if train_marker is None:
                x = vectors.load(store, shard, modality)  # checked now, added by the train task
                vectors.as_float32(x, vectors.embeddings_path(shard, modality))
                if modality == "image":
                    stats.add("vectors", len(x))
                    stats.samples_in(len(x))
                    stats.kept(len(x))
                continue
            n, path = add_shard(store, shard, modality, train_marker, out)
            if modality == "image":
                stats.add("vectors", n)
                stats.samples_in(n)
                stats.kept(n)
            if path is not None:
                files[layout.index_part(shard, modality)] = path
        stats.add("waiting_for_training" if train_marker is None else "added", 1)
        return StageOutput(files)


class TrainIndex(_Index, RunOnce):
    name = TRAIN
    stage = "index"

    def due(self, store: Store) -> str | None:
        if trained(self.state(store)) is not None:
            return None
        state = self.state(store)
        embedded = state.stage("embed").samples_out  # O(1) with the run index
        if embedded is None:  # a marker without the count: the arrays' headers say it
            embedded = sum(embedded_counts(state).values())
        if embedded >= self.options.index_train_after:
            return TRAIN_KEY
        return TRAIN_KEY if state.stage("index").upstream_complete else None

    def expected_vectors(self, store: Store, counts: dict[int, int]) -> int:
        """The run's final size, for the key: the option, or vectors per embedded shard times the
        shards expected so far (exact once every shard is embedded)."""
        total = sum(counts.values())
        if self.options.index_expected_vectors:
            return max(self.options.index_expected_vectors, total)
        state = self.state(store).stage("embed")
        if state.complete or not state.n_done:
            return total
        return max(total, round(total / state.n_done * state.n_expected))

    def run(self, store: Store, key: str, out: Path, stats: Stats, **inputs) -> StageOutput:
        build.threads()
        counts = {s: n for s, n in embedded_counts(self.state(store)).items() if n > 0}
        stats.add("shards", len(counts))
        stats.add("vectors", sum(counts.values()))
        if not counts:  # nothing was embedded: the merge publishes an empty index
            stats.put("index_key", None)
            return StageOutput({})
        # the width most vectors have; a shard of another width is left out of the sample and
        # dead-lettered when it is added, rather than failing the training for every shard
        widths = {s: int(vectors.load(store, s).shape[1]) for s in counts}
        dim = max(sorted(set(widths.values()), key=lambda w: min(s for s in counts if widths[s] == w)),
                  key=lambda w: sum(n for s, n in counts.items() if widths[s] == w))  # ties: the first shard's
        odd = sorted(s for s in counts if widths[s] != dim)
        if odd:
            log.error("shards %s have vectors of another width than %d; not trained on", odd, dim)
            counts = {s: n for s, n in counts.items() if widths[s] == dim}
        expected = self.expected_vectors(store, counts)
        index_key = build.choose_key(expected, dim, self.options.index_memory, self.options.index_key)
        size = build.train_size(expected, index_key, self.options.index_train_memory, dim)
        files = {}
        for modality in modalities(self.options):
            started = time.time()
            sample, _ = vectors.sample(store, counts, size if build.needs_training(index_key) else 0,
                                       self.options.index_seed, modality, dim)
            index = build.train(dim, index_key, sample)
            path = out / f"{modality}-trained.index"
            build.write(index, path)
            files[layout.trained_index(modality)] = path
            stats.put(f"{modality}_train_s", round(time.time() - started, 3))
            log.info("trained %s %s index on %d of %d vectors in %.1fs", index_key, modality,
                     len(sample), sum(counts.values()), time.time() - started)
            stats.put("ivf", build.is_ivf(index))
            if modality == "image":
                stats.add("train_vectors", len(sample))
        stats.put("index_key", index_key)
        stats.put("dim", dim)
        stats.put("expected_vectors", expected)
        return StageOutput(files)

    def after(self, store_uri: str, key: str) -> None:
        """Add the shards that were marked while the index was untrained (each commits on its own,
        so a redelivery adds only those still missing)."""
        store = Store(store_uri)
        marker = trained(self.state(store))
        for name in sorted(store.done(IndexStage.name)):
            if not waiting(self.state(store), name) or store.marker(PART_MARKERS, name) is not None:
                continue
            with store.staging() as out:
                files, n = {}, 0
                try:
                    for modality in modalities(self.options):
                        count, path = add_shard(store, int(name), modality, marker, out)
                        n = count if modality == "image" else n
                        if path is not None:
                            files[layout.index_part(int(name), modality)] = path
                except vectors.BadEmbeddings as exc:  # this shard fails for good; the others go on
                    log.error("index %s: %s", name, exc)
                    store.write_deadletter(PART_MARKERS, name, {"error": f"BadEmbeddings: {exc}"})
                    continue
                part = store.commit(PART_MARKERS, name, files, {"stats": {"vectors": n}})
                if self.run_index is not None:
                    self.run_index.record(PART_MARKERS, None, part)


class MergeIndex(_Index, RunOnce):
    name = "index-merge"
    stage = "index"

    def due(self, store: Store) -> str | None:
        if trained(self.state(store)) is None:
            return None
        state = self.state(store).stage(IndexStage.name)
        if not state.complete:
            return None
        shards, all_ready = indexed_shards(self.state(store), state.done)
        if not all_ready:
            return None  # the train task is still adding the shards that waited
        infos = read_infos(store)
        if infos is not None and sorted(infos.get("shards", [])) == shards:
            return None
        digest = hashlib.sha1(",".join(map(str, shards)).encode()).hexdigest()[:10]
        return f"{len(shards):06d}-{digest}"

    def run(self, store: Store, key: str, out: Path, stats: Stats, **inputs) -> StageOutput:
        build.threads()
        train_marker = trained(self.state(store))
        state = self.state(store).stage(IndexStage.name)
        shards, _ = indexed_shards(self.state(store), state.done)
        previous = read_infos(store)
        generation = (previous or {}).get("generation", 0) + 1
        gen_files, infos_files = {}, {}
        for modality in modalities(self.options):
            infos = self.merge(store, modality, shards, generation, train_marker, out, stats)
            gen_files.update(infos.pop("_files"))
            path = out / f"{modality}-infos.json"
            path.write_text(json.dumps(infos, indent=1, sort_keys=True))
            infos_files[layout.index_infos(modality)] = path
        stats.put("generation", generation)
        stats.add("shards", len(shards))
        # infos.json last: it is what switches search to the new generation
        return StageOutput({**gen_files, **infos_files})

    def merge(self, store: Store, modality: str, shards: list[int], generation: int, train_marker: dict,
              out: Path, stats: Stats) -> dict:
        started = time.time()
        gen_dir = out / f"{modality}-{generation:05d}"
        gen_dir.mkdir()
        rel_dir = layout.serving_dir(generation, modality)
        key = train_marker["stats"].get("index_key")
        dim = train_marker["stats"].get("dim")
        ivf = bool(train_marker["stats"].get("ivf"))
        infos = {"modality": modality, "generation": generation, "index_key": key, "dim": dim,
                 "model": self.run_config.embed.embed_model,   # what queries must be embedded with
                 "metric": "inner_product", "shards": shards, "takedowns": layout.TAKEDOWN_IDS,
                 "index_memory": self.options.index_memory, "query_budget_ms": self.options.index_query_ms,
                 "trained": {"vectors": train_marker["stats"].get("train_vectors"),
                             "expected_vectors": train_marker["stats"].get("expected_vectors"),
                             "at": train_marker["finished_at"]},
                 "built_at": time.time(), "_files": {}}
        if key is None or not shards:
            infos.update(index_file=None, ivfdata_file=None, vectors=0, size_bytes=0, search_params="")
            return infos
        scratch = out / "parts"
        scratch.mkdir(exist_ok=True)
        trained_path = _local(store, layout.trained_index(modality), scratch)
        if ivf:
            parts = [_local(store, layout.index_part(s, modality), scratch) for s in shards]
            build.merge_ivf(trained_path, parts, gen_dir)
        else:
            self.merge_flat(store, modality, shards, trained_path, gen_dir, dim, scratch)
        index_file, ivfdata = gen_dir / build.INDEX_FILE, gen_dir / build.IVF_DATA
        infos["_files"][f"{rel_dir}/{build.INDEX_FILE}"] = index_file
        if ivf:
            infos["_files"][f"{rel_dir}/{build.IVF_DATA}"] = ivfdata
        infos.update(index_file=f"{rel_dir}/{build.INDEX_FILE}",
                     ivfdata_file=f"{rel_dir}/{build.IVF_DATA}" if ivf else None,
                     size_bytes=sum(p.stat().st_size for p in infos["_files"].values()))
        from clipfleet.shared.serving import open_index
        index = open_index(index_file, ivf)
        infos["vectors"] = int(index.ntotal)
        stats.put(f"{modality}_merge_s", round(time.time() - started, 3))
        infos.update(self.evaluate(store, modality, shards, index, key, dim))
        stats.put(f"{modality}_recall@10", infos.get("recall@10"))
        return infos

    def merge_flat(self, store, modality, shards, trained_path, gen_dir, dim, scratch) -> None:
        """Flat / HNSW: the previous generation plus the shards it lacks (HNSW graphs grow by adding)."""
        previous = read_infos(store, modality)
        index, have = None, set()
        if previous and previous.get("index_file") and set(previous["shards"]) <= set(shards):
            index = build.read(_local(store, previous["index_file"], scratch))
            have = set(previous["shards"])
        index = index or build.read(trained_path)
        for shard in shards:
            if shard not in have:
                x = vectors.load(store, shard, modality, dim)
                index.add_with_ids(vectors.as_float32(x), vectors.ids_of(shard, len(x)))
        build.write(index, gen_dir / build.INDEX_FILE)

    def evaluate(self, store, modality, shards, index, key, dim) -> dict:
        """Search parameters for the budget, then recall and latency on held-out queries."""
        nq = self.options.index_eval_queries
        if not nq:
            return {"search_params": "", "recall": "not measured (--index-eval-queries 0)"}
        counts = {s: len(vectors.load(store, s, modality, dim)) for s in shards}
        source = vectors.other_modality(modality)
        if all(store.exists(vectors.embeddings_path(s, source)) for s in shards):
            queries, _ = vectors.sample(store, counts, nq, self.options.index_seed + 1, source, dim)
            what = f"{source} embeddings of {len(queries)} random samples (not in the {modality} index)"
        else:  # no other modality: nearby points that are not in the index
            base, _ = vectors.sample(store, counts, nq, self.options.index_seed + 1, modality, dim)
            rng = np.random.default_rng(self.options.index_seed + 2)
            queries = base + rng.standard_normal(base.shape).astype(np.float32) * (0.5 / np.sqrt(dim))
            what = f"{len(queries)} indexed vectors moved by noise (no {source} embeddings to query with)"
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, exact = vectors.exact_search(store, shards, queries, 10, modality, dim)
        tuned = tuning.tune(index, key, queries, exact, self.options.index_query_ms)
        measured = tuning.measure(index, queries, exact)
        return {"search_params": tuned["params"], "queries": what, "tuning": tuned["tried"], **measured}

    def after(self, store_uri: str, key: str) -> None:
        """Keep the current and the previous generation (a server may still have it open)."""
        store = Store(store_uri)
        for modality in modalities(self.options):
            infos = read_infos(store, modality)
            if not infos:
                continue
            root = f"{layout.index_root(modality)}/serving"
            for name in store.list(root):
                if name.isdigit() and int(name) < infos["generation"] - 1:
                    store.fs.rm(store.path(f"{root}/{name}"), recursive=True)


IndexStage.triggers = (TrainIndex.name, MergeIndex.name, DEDUP)
TrainIndex.triggers = (MergeIndex.name,)
MergeIndex.triggers = (DEDUP,)  # its groups are of the generation just merged
