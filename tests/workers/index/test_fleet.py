"""A real index-merge worker SIGKILLed during training, during a merge, while grouping near-duplicates
and during a shard's add: nothing half-done is visible, and the redelivered tasks finish the index
(and the near-duplicate groups) the run would have had."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from clipfleet.producer.fleet import Fleet, state_dir
from clipfleet.shared.leases import run_key
from clipfleet.workers.index.plan import settled
from clipfleet.shared.storage import Store
from clipfleet.workers.app import make_app
from clipfleet.shared.serving import ServingIndex
from tests.helpers import wait_until
from tests.workers.index.conftest import World, add_shard, drive, make_run

# near_dup_eps: this world's clusters are far denser than CLIP's (a third of its vectors have a
# neighbour within cosine 0.95), so a tight eps keeps the groups few
OPTIONS = dict(index_key="IVF512,PQ8", index_eval_queries=300, index_seed=3, near_dup_eps=0.001)
VISIBILITY = 30


def build_store(path: Path, world: World) -> Store:
    store = make_run(str(path), **OPTIONS)
    for s in range(4):
        add_shard(store, world, s, 12_500)
    return store


def in_staging(tmpdir: Path) -> bool:
    return any(p.name.startswith("clipfleet-") and p.is_dir() for p in tmpdir.iterdir())


@pytest.mark.timeout(600)
def test_worker_killed_in_train_merge_and_add_loses_nothing(tmp_path, isolated_state, monkeypatch):
    monkeypatch.setenv("CLIPFLEET_SOFT_TIME_LIMIT", str(VISIBILITY - 5))
    monkeypatch.setenv("CLIPFLEET_HARD_TIME_LIMIT", str(VISIBILITY - 2))
    monkeypatch.setenv("CLIPFLEET_VISIBILITY_TIMEOUT", str(VISIBILITY))
    worker_tmp = tmp_path / "worker-tmp"
    worker_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(worker_tmp))   # the worker's staging directories show up here
    world = World(dim=16, latent=6, seed=5)

    reference = build_store(tmp_path / "reference", world)
    drive(reference, range(4))
    add_shard(reference, world, 4, 200_000)
    drive(reference, [4])

    store = build_store(tmp_path / "store", world)
    fleet = Fleet(log_dir=tmp_path)
    try:
        fleet.start_redis(state_dir("index-kill-test"))
        broker = redis.Redis.from_url(fleet.broker)
        app = make_app(fleet.broker)
        worker = fleet.start_worker(["index-merge"], concurrency=1)
        fleet.wait_for_workers(1)

        def kill_and_restart():
            nonlocal worker
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            # kombu hands the dead worker's unacked task back once it is older than the
            # visibility timeout; a worker looks for such tasks as it starts
            delivered = [t for _, t in broker.zrange("unacked_index", 0, -1, withscores=True)]
            time.sleep(max([0.0] + [t + VISIBILITY + 0.5 - time.time() for t in delivered]))
            for p in worker_tmp.iterdir():  # what the killed process left in its scratch space
                if p.is_dir():
                    __import__("shutil").rmtree(p)
            worker = fleet.start_worker(["index-merge"], concurrency=1)

        for s in range(4):  # as the tag stage hands each shard on
            app.send_task("clipfleet.index", args=(store.uri, s))
        lock = f"clipfleet:once-lock:{run_key(store.uri)}:"

        # 1. killed while training
        wait_until(lambda: broker.exists(lock + "index-train") and in_staging(worker_tmp), 300, "training", 0.02)
        kill_and_restart()
        assert store.marker("index-train", "train") is None and not store.exists("index/trained.index")
        assert {m["stats"].get("waiting_for_training") for m in store.markers("index")} == {1}

        # 2. killed while merging
        wait_until(lambda: broker.exists(lock + "index-merge") and in_staging(worker_tmp), 300, "the merge", 0.02)
        kill_and_restart()
        assert not store.exists("index/infos.json") and not store.done("index-merge")
        assert store.done("index-train") == {"train"}

        # 3. killed while grouping near-duplicates (after that merge)
        wait_until(lambda: broker.exists(lock + "index-dedup") and in_staging(worker_tmp), 300, "dedup", 0.02)
        kill_and_restart()
        assert not store.exists("dedup/info.json") and not store.done("index-dedup")

        wait_until(lambda: settled(store), 300, "the first merge")
        assert store.read_json("index/infos.json")["generation"] == 1

        # 4. killed while a late shard is added
        add_shard(store, world, 4, 200_000)
        app.send_task("clipfleet.index", args=(store.uri, 4))
        wait_until(lambda: in_staging(worker_tmp), 300, "shard 4 being added", 0.02)
        kill_and_restart()
        assert store.marker("index", 4) is None and not store.exists("index/parts/00004.index")
        wait_until(lambda: settled(store), 300, "the second merge")
    finally:
        fleet.stop(grace=5)

    infos, want = store.read_json("index/infos.json"), reference.read_json("index/infos.json")
    assert infos["generation"] == want["generation"] == 2 and infos["vectors"] == want["vectors"] == 250_000
    assert store.done("index-train") == {"train"} and not store.deadletters("index")
    assert store.read_bytes("index/trained.index") == reference.read_bytes("index/trained.index")
    assert store.read_bytes("dedup/groups.parquet") == reference.read_bytes("dedup/groups.parquet")
    assert store.done("index-dedup") == reference.done("index-dedup") == {"g00001", "g00002"}
    queries = world.vectors(50, 77).astype(np.float32)
    got, expected = ServingIndex.open(store).search(queries, 10), ServingIndex.open(reference).search(queries, 10)
    assert (got[1] == expected[1]).all() and np.array_equal(got[0], expected[0])
