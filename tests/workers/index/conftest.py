"""The index tests' world: a run whose upstream stages are written here with numpy (embeddings,
metadata, markers as the embed and tag stages leave them), and a driver that runs the index tasks
in this process in the order a fleet would."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.shared import layout
from clipfleet.shared.pipeline import execute
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store, shard_name
from clipfleet.workers.index.dedup import DedupIndex
from clipfleet.workers.index.stage import IndexStage, MergeIndex, TrainIndex

UPSTREAM = ("download", "clip", "embed", "tag")


class World:
    """Clustered unit vectors with a low intrinsic dimension, as CLIP embeddings have; a sample's
    text embedding is its image embedding moved by noise (a caption is near its image)."""

    def __init__(self, dim: int = 32, latent: int = 8, clusters: int = 100, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.latent, self.seed = dim, latent, seed
        self.projection = rng.standard_normal((latent, dim)).astype(np.float32)
        self.centers = 2 * rng.standard_normal((clusters, latent)).astype(np.float32)

    def vectors(self, n: int, seed) -> np.ndarray:
        rng = np.random.default_rng([self.seed, seed])
        z = self.centers[rng.integers(len(self.centers), size=n)] + rng.standard_normal((n, self.latent))
        x = z.astype(np.float32) @ self.projection
        x += 0.1 * np.sqrt(self.latent) * rng.standard_normal((n, self.dim)).astype(np.float32)
        return normalise(x)

    def texts(self, images: np.ndarray, seed) -> np.ndarray:
        rng = np.random.default_rng([self.seed, seed, 7])
        return normalise(images.astype(np.float32) + 0.3 * rng.standard_normal(images.shape).astype(np.float32) / np.sqrt(self.dim) * 3)


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def make_run(store_uri: str, **options) -> Store:
    store = Store(store_uri)
    RunConfig.make(store=store_uri, input_kind="urls", inputs=["given.parquet"], **options).save(store)
    return store


def sample_key(shard: int, row: int) -> str:
    return f"{shard:05d}{row:04d}"


def add_shard(store: Store, world: World, shard: int, n: int, texts: bool = True,
              stages=UPSTREAM) -> np.ndarray:
    """One shard as the stages up to tag leave it: a URL shard, embeddings, metadata, and the
    markers of `stages` (the rest can follow with `mark`)."""
    images = world.vectors(n, shard)
    keys = [sample_key(shard, r) for r in range(n)]
    urls = [f"http://127.0.0.1/img/{shard}/{r}.jpg" for r in range(n)]
    import io
    def put_parquet(rel, table):
        buf = io.BytesIO()
        pq.write_table(table, buf)
        store.write_bytes(rel, buf.getvalue())
    def put_npy(rel, array):
        buf = io.BytesIO()
        np.save(buf, array)
        store.write_bytes(rel, buf.getvalue())
    put_parquet(layout.url_shard(shard), pa.table({"url": urls, "caption": [f"caption {k}" for k in keys]}))
    put_npy(layout.image_embeddings(shard), images)
    if texts:
        put_npy(layout.text_embeddings(shard), world.texts(images, shard))
    put_parquet(layout.embedding_metadata(shard), pa.table({
        "key": keys, "url": urls, "caption": [f"caption {k}" for k in keys],
        "similarity": pa.array(np.full(n, 0.3), pa.float32()), "language": ["en"] * n,
        "width": pa.array([64] * n, pa.int32()), "height": pa.array([64] * n, pa.int32())}))
    sha = [f"{shard:032x}{r:032x}" for r in range(n)]
    put_parquet(layout.image_shard(shard, "parquet"), pa.table({"key": keys, "url": urls, "sha256": sha}))
    put_parquet(layout.dataset_shard(shard, "parquet"), pa.table({
        "key": keys, "URL": urls, "TEXT": [f"caption {k}" for k in keys], "hash": sha}))
    mark(store, shard, n, world.dim, stages)
    return images


def mark(store: Store, shard: int, n: int, dim: int, stages=UPSTREAM) -> None:
    for stage in stages:
        stats = {"vectors": n, "dim": dim} if stage == "embed" else {}
        store.commit(stage, shard, {}, {"stats": stats, "next_shards": [shard]})


def drive(store: Store, shards) -> list[str]:
    """Run the index tasks of `shards` here, with the run-once tasks whenever they are due, as
    the fleet would; returns what ran, in order."""
    cfg = RunConfig.load(store)
    stage, train, merge, dedup = IndexStage(cfg), TrainIndex(cfg), MergeIndex(cfg), DedupIndex(cfg)
    ran = []

    def once(task):
        key = task.due(store)
        if key is not None and store.marker(task.name, key) is None:
            execute(task, store, key)
            task.after(store.uri, key)
            ran.append(f"{task.name} {key}")
            return True
        return False

    for shard in shards:
        execute(stage, store, shard)
        ran.append(f"index {shard}")
        if once(train):
            once(merge) and once(dedup)
        once(merge) and once(dedup)
    return ran


@pytest.fixture
def world():
    return World()


@pytest.fixture(autouse=True)
def one_faiss_thread(monkeypatch):
    """The test machine's cores are shared with other work: one OpenMP thread, here and in the
    workers the tests start, is faster than a thread team that spins waiting for a core."""
    import faiss
    monkeypatch.setenv("CLIPFLEET_INDEX_THREADS", "1")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
