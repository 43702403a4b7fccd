"""A shard that fails for good is dead-lettered without holding up the rest of the run, and
`clipfleet run` on the same store, with the same arguments, replays it to the end.

The failure is the one a fleet meets most: a shard that keeps killing its worker (an image
that runs a node out of memory). Here the run gives up on a shard after its first recovery
(CLIPFLEET_MAX_RECOVERIES=0) and the test SIGKILLs the node while it runs a CLIP task; the
rerun, with the default budget, finishes it and the index takes it in.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from clipfleet.shared.storage import Store
from tests.e2e.faults import CLI, REPO, Workers, check_published, delivered, read_table
from tests.e2e.test_pipeline_faults import RUN_OPTIONS
from tests.recovery.conftest import RECOVERY_ENV


def run_pipeline(argv: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(CLI + argv, cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.timeout(600)
def test_a_dead_lettered_shard_is_replayed_by_the_same_command(tmp_path, fault_world, fault_web, redis_aof):
    store = Store(str(tmp_path / "store"))
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, **RECOVERY_ENV}
    workers = Workers(logs, redis_aof.url, env)
    wats = sorted(str(p) for p in (fault_world / "wat").iterdir())[:2]
    argv = ["run", "--wat", *wats, "--store", store.uri, "--broker", redis_aof.url, *RUN_OPTIONS]
    try:
        workers.start("all")  # one node serving every queue
        first = run_pipeline(argv, {**env, "CLIPFLEET_MAX_RECOVERIES": "0"}, logs / "run-1.log")
        deadline = time.monotonic() + 300
        while not (clip := delivered(redis_aof.url, older_than=0.2).get("gpu-clip")):
            assert first.poll() is None and time.monotonic() < deadline, (logs / "run-1.log").read_text()[-3000:]
            time.sleep(0.05)
        workers.signal("all", signal.SIGKILL)
        shard = int(clip[0][2].rsplit(",", 1)[1].strip(" )"))
        workers.start("all")
        assert first.wait(300) == 1
        out = (logs / "run-1.log").read_text()
        assert f"dead letter clip {shard:05d}: recovered 0 times and never finished" in out, out[-3000:]
        assert [d["shard"] for d in store.deadletters("clip")] == [shard]
        assert store.marker("clip", shard) is None
        published_before = len(store.done("tag"))
        assert published_before == len(store.done("download")) - 1  # the rest of the run went on

        second = run_pipeline(argv, env, logs / "run-2.log")
        code = second.wait(300)
        out = (logs / "run-2.log").read_text()
        assert code == 0, out[-3000:]
    finally:
        workers.stop()
    assert f"replaying dead-lettered clip shard {shard:05d}" in out
    counts = check_published(store)
    assert counts["shards"] == published_before + 1
    assert read_table(store, f"dataset/{shard:05d}.parquet").num_rows > 0
    assert store.read_json("index/infos.json")["generation"] == 2  # merged again with the replayed shard
    assert store.list("_deadletter/clip/replayed")  # the record is kept beside, not deleted
