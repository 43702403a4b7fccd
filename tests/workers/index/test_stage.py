"""The index stage in this process: training once, adding shards, merging, ids, takedowns."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipfleet.shared import layout
from clipfleet.shared.pipeline import execute
from clipfleet.shared.runstate import RunState
from clipfleet.shared.runconfig import RunConfig
from clipfleet.workers.index import vectors
from clipfleet.shared.serving import IndexNotBuilt, ServingIndex
from clipfleet.workers.index.stage import IndexStage
from tests.workers.index.conftest import World, add_shard, drive, make_run, mark, sample_key

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[3]


def exact(store, shards, queries, k):
    return vectors.exact_search(store, shards, queries.astype(np.float32), k)


def test_small_run_trains_once_merges_once_and_ids_point_at_their_metadata_rows(store_uri, world):
    store = make_run(store_uri)
    shards = [3, 4, 7]
    for s in shards:
        add_shard(store, world, s, 200)
    ran = drive(store, shards)
    assert [r.split()[0] for r in ran] == ["index", "index-train", "index", "index", "index-merge", "index-dedup"]
    assert store.done("index-train") == {"train"} and len(store.done("index-merge")) == 1
    infos = store.read_json("index/infos.json")
    # under 1000 vectors autofaiss builds an exact index
    assert infos["index_key"] == "Flat" and infos["vectors"] == 600 and infos["dim"] == world.dim
    assert infos["shards"] == shards and infos["generation"] == 1
    assert infos["model"] == RunConfig.load(store).embed.embed_model
    assert infos["recall@1"] == infos["recall@10"] == 1.0 and infos["latency_ms"]["p99"] > 0
    assert "text embeddings" in infos["queries"] and infos["size_bytes"] > 600 * world.dim * 4

    index = ServingIndex.open(store)
    assert index.ntotal == 600 and index.dim == world.dim
    queries = world.vectors(20, 1000).astype(np.float32)
    sims, ids = index.search(queries, 10)
    want_sims, want_ids = exact(store, shards, queries, 10)
    assert (ids == want_ids).all() and np.allclose(sims, want_sims, atol=1e-5)
    # an id is (shard, row): its metadata row is the sample whose vector was found
    rows = index.metadata(ids[:, 0])
    for gid, row, q, s in zip(ids[:, 0], rows, queries, sims[:, 0]):
        shard, r = layout.split_id(gid)
        assert row["key"] == sample_key(shard, r)
        x = vectors.load(store, shard)[r].astype(np.float32)
        assert abs(float(x @ q) - s) < 1e-4


def test_shards_before_training_wait_and_the_train_task_adds_them(tmp_path, world):
    store = make_run(str(tmp_path / "store"), index_key="IVF16,Flat", index_train_after=1500)
    for s in range(3):
        add_shard(store, world, s, 600)
    # only shard 0 has arrived at the index stage: below the threshold? no: 1800 embedded >= 1500
    cfg = RunConfig.load(store)
    store_state = RunState(store, cfg).stage("index")
    assert store_state.expected == {"00000", "00001", "00002"} and store_state.upstream_complete
    ran = drive(store, [0, 1, 2])
    assert ran[:2] == ["index 0", "index-train train"]
    assert store.marker("index", 0)["stats"]["waiting_for_training"] == 1
    assert store.marker("index-part", 0)["stats"]["vectors"] == 600       # added by the train task
    assert store.marker("index", 1)["stats"]["added"] == 1
    infos = store.read_json("index/infos.json")
    assert infos["vectors"] == 1800 and infos["ivfdata_file"].endswith("merged.ivfdata")


def test_shards_added_after_a_merge_give_the_same_neighbours_as_one_merge_of_all(tmp_path, world):
    opts = dict(index_key="IVF32,PQ8", index_train_after=2000, index_eval_queries=200)

    def grown(name):
        store = make_run(str(tmp_path / name), **opts)
        for s in (0, 1):
            add_shard(store, world, s, 1500)
        return store

    incremental = grown("incremental")
    drive(incremental, [0, 1])                       # trained on shards 0-1, merged
    trained = incremental.read_bytes("index/trained.index")
    assert incremental.read_json("index/infos.json")["vectors"] == 3000
    add_shard(incremental, world, 2, 1500)           # a shard that arrives after the merge
    ran = drive(incremental, [2])
    assert [r.split()[0] for r in ran] == ["index", "index-merge", "index-dedup"]  # merged in, not retrained
    assert incremental.read_bytes("index/trained.index") == trained
    assert incremental.done("index-train") == {"train"}
    assert incremental.read_json("index/infos.json")["generation"] == 2

    rebuilt = grown("rebuilt")                       # shard 2 is downloading while 0-1 train
    add_shard(rebuilt, world, 2, 1500, stages=("download",))
    drive(rebuilt, [0, 1])
    assert not rebuilt.exists("index/infos.json")
    mark(rebuilt, 2, 1500, world.dim, ("clip", "embed", "tag"))
    drive(rebuilt, [2])                              # all three in the one merge
    assert rebuilt.read_json("index/infos.json")["generation"] == 1

    queries = world.vectors(100, 5000).astype(np.float32)
    a, b = ServingIndex.open(incremental), ServingIndex.open(rebuilt)
    assert a.ntotal == b.ntotal == 4500
    sa, ia = a.search(queries, 10)
    sb, ib = b.search(queries, 10)
    assert (ia == ib).all() and np.array_equal(sa, sb)
    assert (ia >> layout.ROW_BITS == 2).any()        # the late shard is found


def test_a_serving_index_follows_a_new_merge(tmp_path, world):
    store = make_run(str(tmp_path / "store"))
    add_shard(store, world, 0, 300)
    drive(store, [0])
    index = ServingIndex.open(store, refresh_s=0)
    assert index.ntotal == 300
    add_shard(store, world, 1, 300)
    drive(store, [1])
    index.search(world.vectors(1, 9).astype(np.float32), 5)
    assert index.ntotal == 600 and index.infos["generation"] == 2


def test_bad_embeddings_fail_with_a_message_naming_the_file(tmp_path, world):
    store = make_run(str(tmp_path / "store"))
    add_shard(store, world, 0, 50)
    bad = np.load(io.BytesIO(store.read_bytes(layout.image_embeddings(0))))
    bad[3, 0] = np.nan
    buf = io.BytesIO()
    np.save(buf, bad)
    store.write_bytes(layout.image_embeddings(0), buf.getvalue())
    with pytest.raises(vectors.BadEmbeddings, match=r"img_emb_00000.npy.*NaN"):
        execute(IndexStage(RunConfig.load(store)), store, 0)
    assert store.marker("index", 0) is None
    np.save(buf := io.BytesIO(), bad[:40])
    store.write_bytes(layout.image_embeddings(0), buf.getvalue())
    with pytest.raises(vectors.BadEmbeddings, match="40 vectors but .*metadata_00000.parquet has 50 rows"):
        execute(IndexStage(RunConfig.load(store)), store, 0)


def test_a_text_index_is_built_on_request_and_its_absence_is_named(tmp_path, world):
    plain = make_run(str(tmp_path / "plain"))
    add_shard(plain, world, 0, 100)
    drive(plain, [0])
    with pytest.raises(IndexNotBuilt, match="no text index"):
        ServingIndex.open(plain, modality="text")
    both = make_run(str(tmp_path / "both"), index_text=True)
    add_shard(both, world, 0, 100)
    drive(both, [0])
    text = ServingIndex.open(both, modality="text")
    caption = vectors.load(both, 0, "text")[17:18].astype(np.float32)
    assert text.search(caption, 1)[1][0, 0] == layout.global_id(0, 17)
    assert "image embeddings" in text.infos["queries"]


def test_a_run_without_vectors_serves_an_empty_index(tmp_path, world):
    store = make_run(str(tmp_path / "store"))
    add_shard(store, world, 0, 0, texts=False)
    drive(store, [0])
    index = ServingIndex.open(store)
    sims, ids = index.search(np.ones((2, world.dim), np.float32), 3)
    assert index.ntotal == 0 and (ids == -1).all() and np.isneginf(sims).all()


def test_a_waiting_shard_whose_vectors_do_not_fit_the_trained_index_is_dead_lettered_alone(tmp_path, world):
    store = make_run(str(tmp_path / "store"), index_key="IVF8,Flat", index_train_after=10_000)
    add_shard(store, world, 0, 300)
    add_shard(store, world, 1, 300, stages=("download",))
    drive(store, [0])                                  # waits: 300 < 10 000 and shard 1 is on its way
    odd = World(dim=world.dim * 2)
    add_shard(store, odd, 1, 300)                      # shard 1 arrives with vectors of another width
    store.commit("embed", 1, {}, {"stats": {"vectors": 300, "dim": odd.dim}, "next_shards": [1]})
    drive(store, [1])
    assert store.marker("index-part", 0) is not None
    dead = store.deadletters("index-part")
    assert [d["shard"] for d in dead] == ["00001"] and "dimensions" in dead[0]["error"]
    assert store.read_json("index/infos.json")["shards"] == [0]


def test_exact_search_is_the_brute_force_top_k_across_shards(store_uri, world):
    store = make_run(store_uri)
    sizes = {2: 300, 5: 4, 9: 150}  # shard 5 holds fewer vectors than k
    data = {s: add_shard(store, world, s, n) for s, n in sizes.items()}
    queries = world.vectors(40, 77).astype(np.float32)
    sims, ids = exact(store, sorted(sizes), queries, 10)
    every = np.concatenate([data[s].astype(np.float32) for s in sorted(sizes)])
    every_ids = np.concatenate([vectors.ids_of(s, n) for s, n in sorted(sizes.items())])
    brute = queries @ every.T
    order = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    assert np.array_equal(ids, every_ids[order])
    assert np.allclose(sims, np.take_along_axis(brute, order, 1), atol=1e-5)
