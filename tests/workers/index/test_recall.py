"""Recall under a memory budget that forces product quantization, measured as infos.json says."""
from __future__ import annotations

import numpy as np
import pytest

from clipfleet.workers.index import tuning, vectors
from clipfleet.shared.serving import ServingIndex
from tests.workers.index.conftest import World, add_shard, drive, make_run


@pytest.mark.timeout(900)
def test_recall_at_10_on_100k_clustered_vectors_under_a_budget_that_forces_pq(tmp_path):
    world = World(dim=16, latent=6, clusters=100, seed=1)
    # 100 000 x 16 float32 is 6.4 MB; 3 MB fits neither HNSW nor IVF-Flat: autofaiss goes to PQ
    store = make_run(str(tmp_path / "store"), index_memory="3M", index_train_memory="40M",
                     index_train_after=60_000, index_eval_queries=500)
    shards = list(range(10))
    for s in shards:
        add_shard(store, world, s, 10_000)
    drive(store, shards)
    infos = store.read_json("index/infos.json")
    assert "PQ" in infos["index_key"] and "IVF" in infos["index_key"], infos["index_key"]
    assert infos["vectors"] == 100_000 and infos["size_bytes"] < 3 * 2 ** 20
    assert infos["recall@10"] >= 0.9, infos
    assert infos["latency_ms"]["p99"] >= infos["latency_ms"]["p50"] > 0

    # the same on queries of our own, never in the index, through the serving index
    index = ServingIndex.open(store)
    queries = world.vectors(300, 123_456).astype(np.float32)
    _, exact = vectors.exact_search(store, shards, queries, 10)
    _, found = index.search(queries, 10)
    measured = tuning.recalls(found, exact)
    assert measured["recall@10"] >= 0.9, measured
