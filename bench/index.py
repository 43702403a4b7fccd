"""Index benchmark: autofaiss `build_index` beside this stage on the same embeddings, under the same
memory budget, in the same run; then 10% more vectors, added by the stage against rebuilt by
autofaiss (autofaiss cannot add to an index).

The embeddings are clustered unit vectors with a low intrinsic dimension (as CLIP embeddings
are), float16, in clip-retrieval's layout (one .npy per shard), which autofaiss reads as they
are. Both sides pick their key the same way (autofaiss's heuristic for the size, dimension and
budget), use every core, and are scored on the same 1000 held-out queries (never in either
index) against exact search; each side searches with the parameters it tuned itself.

Build time is wall and CPU time (both sides run in this process; the ratios use CPU time, which
other work on a shared machine does not stretch) from the embeddings to a searchable index with
its parameters chosen:
autofaiss's build_index call; the stage's train task, one add task per shard, and the merge task
(which also measures recall and latency for index/infos.json).

Sizes: CLIPFLEET_BENCH_INDEX_VECTORS (default 200 000; BENCH_INDEX_VECTORS also read) x BENCH_INDEX_DIM
(default 768, LAION's ViT-L/14 width), shards of BENCH_INDEX_SHARD (default: a tenth of the
vectors), budget BENCH_INDEX_MEMORY (default 1/64 of the float32 size, 48 bytes a vector: at
200 000 x 768 autofaiss picks OPQ32_224,IVF2048_HNSW32,PQ32x8, at 20 000 OPQ32_224,IVF512,PQ32x8;
a budget of 1/5 picks OPQ256_1024, whose OPQ training alone takes most of an hour on two cores).
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

QUERIES = 1000


def sizes() -> dict:
    from bench.sizes import size
    n = int(os.environ.get("BENCH_INDEX_VECTORS") or size("INDEX_VECTORS"))
    dim = int(os.environ.get("BENCH_INDEX_DIM", 768))
    shard = int(os.environ.get("BENCH_INDEX_SHARD") or max(1, n // 10))
    memory = os.environ.get("BENCH_INDEX_MEMORY") or f"{max(1, n * dim * 4 // 64 // 1024)}K"
    return {"vectors": n, "dim": dim, "shard": shard, "memory": memory}


class Vectors:
    """Clustered unit vectors: 200 centres in a latent space of dim/4, projected and noised."""

    def __init__(self, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.latent = dim, max(4, dim // 4)
        self.projection = rng.standard_normal((self.latent, dim)).astype(np.float32)
        self.centres = 2 * rng.standard_normal((200, self.latent)).astype(np.float32)

    def make(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 17])
        z = self.centres[rng.integers(len(self.centres), size=n)] + rng.standard_normal((n, self.latent))
        x = z.astype(np.float32) @ self.projection
        x += 0.1 * np.sqrt(self.latent) * rng.standard_normal((n, self.dim)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_shard(store, shard: int, x: np.ndarray) -> None:
    """One shard's embeddings and metadata as the embed stage writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from clipfleet.shared import layout
    buf = io.BytesIO()
    np.save(buf, x)
    store.write_bytes(layout.image_embeddings(shard), buf.getvalue())
    # captions' embeddings: near their image's, as CLIP puts them (the stage's held-out queries)
    rng = np.random.default_rng([shard, 3])
    text = x.astype(np.float32) + rng.standard_normal(x.shape).astype(np.float32) * (0.9 / np.sqrt(x.shape[1]))
    buf = io.BytesIO()
    np.save(buf, (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float16))
    store.write_bytes(layout.text_embeddings(shard), buf.getvalue())
    keys = [f"{shard:05d}{r:05d}" for r in range(len(x))]
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": keys, "url": [f"http://127.0.0.1/{k}.jpg" for k in keys]}), buf)
    store.write_bytes(layout.embedding_metadata(shard), buf.getvalue())


def hand_on(store, shard: int, n: int, dim: int) -> None:
    """The shard's URL shard and the markers of the stages before index: it has arrived."""
    from clipfleet.shared import layout
    store.write_bytes(layout.url_shard(shard), store.read_bytes(layout.embedding_metadata(shard)))
    for stage in ("download", "clip", "embed", "tag"):
        stats = {"vectors": n, "dim": dim} if stage == "embed" else {}
        store.commit(stage, shard, {}, {"stats": stats, "next_shards": [shard]})


def stage_build(store, shards: list[int]) -> None:
    """The stage's tasks in the order one index-merge worker runs them."""
    from clipfleet.shared.pipeline import execute
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.workers.index.stage import IndexStage, MergeIndex, TrainIndex
    cfg = RunConfig.load(store)
    stage, train, merge = IndexStage(cfg), TrainIndex(cfg), MergeIndex(cfg)
    for shard in shards:
        execute(stage, store, shard)
        for task in (train, merge):
            key = task.due(store)
            if key is not None:
                execute(task, store, key)
                task.after(store.uri, key)


def recall_at_10(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean((ids[:, :10] == exact[:, :1]).any(axis=1)))


def autofaiss_build(folder: Path, out: Path, memory: str) -> tuple[float, object, dict]:
    import faiss
    from autofaiss import build_index
    started, cpu = time.time(), time.process_time()
    build_index(embeddings=str(folder), index_path=str(out / "knn.index"), index_infos_path=str(out / "infos.json"),
                max_index_memory_usage=memory, current_memory_available="8G", metric_type="ip",
                max_index_query_time_ms=10.0, verbose=logging.WARNING)
    seconds = (time.time() - started, time.process_time() - cpu)
    infos = json.loads((out / "infos.json").read_text())
    index = faiss.read_index(str(out / "knn.index"))
    faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
    return seconds, index, infos


def main() -> dict:
    import faiss
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.shared.storage import Store
    from clipfleet.shared.serving import ServingIndex
    s = sizes()
    n, dim, per_shard, memory = s["vectors"], s["dim"], s["shard"], s["memory"]
    extra = n // 10
    gen = Vectors(dim)
    print(f"{n} x {dim} float16 vectors in shards of {per_shard}, budget {memory}; then {extra} more; "
          f"{QUERIES} held-out queries; {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        tmp = Path(tmp)
        store = Store(str(tmp / "store"))
        RunConfig.make(store=store.uri, input_kind="urls", inputs=["bench"], index_memory=memory,
                       index_train_after=n).save(store)
        counts = [min(per_shard, n - i) for i in range(0, n, per_shard)]
        shards = list(range(len(counts)))
        more_counts = [min(per_shard, extra - i) for i in range(0, extra, per_shard)]
        more = list(range(len(shards), len(shards) + len(more_counts)))
        for shard, count in zip(shards + more, counts + more_counts):
            write_shard(store, shard, gen.make(count, shard))
        for shard, count in zip(shards, counts):
            hand_on(store, shard, count, dim)
        # autofaiss reads a folder of .npy files: the first n vectors, then all of them
        first, everything = tmp / "emb-first", tmp / "emb-all"
        first.mkdir(), everything.mkdir()
        for shard in shards + more:
            src = Path(store.path(f"embeddings/img_emb/img_emb_{shard:05d}.npy"))
            os.link(src, everything / src.name)
            if shard in shards:
                os.link(src, first / src.name)
        queries = gen.make(QUERIES, 999_999).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)

        def exact(paths):
            flat = faiss.IndexFlatIP(dim)
            for p in sorted(paths.iterdir()):
                flat.add(np.load(p).astype(np.float32))
            return flat.search(queries, 10)[1]

        # autofaiss numbers vectors in file order; the stage's ids are shard << 20 | row
        offsets = np.concatenate([[0], np.cumsum(counts + more_counts)])

        def positions(ids):
            shard, row = ids >> 20, ids & ((1 << 20) - 1)
            return np.where(ids >= 0, offsets[np.clip(shard, 0, len(offsets) - 1)] + row, -1)

        auto_dir = tmp / "autofaiss"
        auto_dir.mkdir()
        auto_s, auto_index, auto_infos = autofaiss_build(first, auto_dir, memory)
        print(f"autofaiss build_index: {auto_infos['index_key']} in {auto_s[0]:.1f}s", flush=True)

        started, cpu = time.time(), time.process_time()
        stage_build(store, shards)
        ours_s = (time.time() - started, time.process_time() - cpu)
        infos = store.read_json("index/infos.json")
        print(f"stage train+add+merge: {infos['index_key']} in {ours_s[0]:.1f}s", flush=True)

        truth = exact(first)
        auto_recall = recall_at_10(auto_index.search(queries, 10)[1], truth)
        served = ServingIndex.open(store)
        ours_recall = recall_at_10(positions(served.search(queries, 10)[1]), truth)
        auto_size = (auto_dir / "knn.index").stat().st_size

        # 10% more: the stage adds the new shards and merges; autofaiss builds again from scratch
        started, cpu = time.time(), time.process_time()
        for shard, count in zip(more, more_counts):
            hand_on(store, shard, count, dim)
        stage_build(store, more)
        add_s = (time.time() - started, time.process_time() - cpu)
        rebuild_dir = tmp / "autofaiss-rebuild"
        rebuild_dir.mkdir()
        rebuild_s, rebuilt, rebuilt_infos = autofaiss_build(everything, rebuild_dir, memory)
        truth_all = exact(everything)
        served.refresh()
        ours_recall_all = recall_at_10(positions(served.search(queries, 10)[1]), truth_all)
        rebuilt_recall = recall_at_10(rebuilt.search(queries, 10)[1], truth_all)
        infos_all = store.read_json("index/infos.json")

    def t(x):
        return f"{x[0]:.1f} / {x[1]:.1f}"

    rows = [
        ("index key", auto_infos["index_key"], infos["index_key"]),
        ("search params", auto_infos["index_param"], infos["search_params"]),
        ("build s (wall / CPU)", t(auto_s), t(ours_s)),
        ("recall@10 (held-out)", f"{auto_recall:.4f}", f"{ours_recall:.4f}"),
        ("size MB", f"{auto_size / 2 ** 20:.2f}", f"{infos['size_bytes'] / 2 ** 20:.2f}"),
        (f"+{extra} vectors s", f"{t(rebuild_s)} rebuild", f"{t(add_s)} add"),
        ("recall@10 after", f"{rebuilt_recall:.4f}", f"{ours_recall_all:.4f}"),
        ("search params after", rebuilt_infos["index_param"], infos_all["search_params"]),
    ]
    print(f"\n{'':>24} {'autofaiss':>22} {'clipfleet index':>22}")
    for name, a, b in rows:
        print(f"{name:>24} {a:>22} {b:>22}")
    for name, i in (("before", infos), ("after", infos_all)):
        print(f"stage's own infos.json {name} the add: recall@1 {i['recall@1']}, recall@10 {i['recall@10']}, "
              f"10-recall@10 {i['10-recall@10']}, p50 {i['latency_ms']['p50']} ms, p99 {i['latency_ms']['p99']} ms "
              f"({i['queries']})", flush=True)
    return {"vectors": n, "dim": dim, "memory": memory, "index_key": infos["index_key"],
            "autofaiss_build_s": round(auto_s[0], 2), "stage_build_s": round(ours_s[0], 2),
            "autofaiss_build_cpu_s": round(auto_s[1], 2), "stage_build_cpu_s": round(ours_s[1], 2),
            "autofaiss_recall@10": auto_recall, "stage_recall@10": ours_recall,
            "autofaiss_size_bytes": auto_size, "stage_size_bytes": infos["size_bytes"],
            "add_10pct_s": round(add_s[0], 2), "autofaiss_rebuild_s": round(rebuild_s[0], 2),
            "stage_recall@10_after_add": ours_recall_all, "autofaiss_recall@10_after_rebuild": rebuilt_recall,
            # CPU seconds: both run in this process, and CPU time does not swing with the
            # other work on a shared machine the way wall time does
            "build_cpu_ratio (autofaiss / stage)": auto_s[1] / ours_s[1],
            "recall_ratio (stage / autofaiss)": ours_recall / auto_recall if auto_recall else float("nan"),
            "add_vs_rebuild_cpu_ratio (rebuild / add)": rebuild_s[1] / add_s[1],
            "generation_after_add": infos_all["generation"]}


if __name__ == "__main__":
    main()
