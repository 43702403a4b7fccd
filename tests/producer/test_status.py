"""`clipfleet status`: per stage expected / done / in flight / queued / recovered / dead, samples,
and every marker count with nested groups, against a real Redis holding real messages and leases."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from clipfleet.shared.recovery import broker_state, recovered_path
from clipfleet.producer.status import collect
from clipfleet.shared import leases
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from clipfleet.workers.app import make_app

REPO = Path(__file__).resolve().parents[2]


def url_shard(store: Store, shard: int, rows: int) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"url": [f"http://x.test/{shard}/{i}.jpg" for i in range(rows)],
                             "caption": ["c"] * rows}), buf)
    store.write_bytes(f"urls/{shard:05d}.parquet", buf.getvalue())


def four_shards(tmp_path) -> Store:
    """Shard 0 done (3 of 5 stored, 2 refused), 1 dead-lettered, 2 and 3 pending."""
    store = Store(str(tmp_path / "store"))
    RunConfig.make(store=store.uri, input_kind="urls", inputs=["in.parquet"], until="download").save(store)
    for shard in range(4):
        url_shard(store, shard, 5)
    store.commit("download", 0, {}, {"stats": {"count": 5, "success": 3, "failed_to_download": 2,
                                               "refused": {"private address": 2}, "politeness_wait_s": 0.5},
                                     "samples_in": 5, "samples_out": 3, "dropped": ["failed_to_download", "refused"],
                                     "started_at": 100.0, "duration_s": 2.0, "next_shards": [0]})
    store.write_deadletter("download", 1, {"error": "ValueError: bad shard"})
    return store


def test_status_counts_every_state_and_nested_counts(tmp_path, redis_url):
    store = four_shards(tmp_path)
    client = redis.Redis.from_url(redis_url)
    # Shard 2 is held by a worker (its lease), shard 3 waits in the queue.
    leases.Heartbeat(lambda: client, lambda: {(store.uri, "download", 2): "running"}, worker="w1").beat()
    make_app(redis_url).send_task("clipfleet.download", args=(store.uri, 3))

    info = collect(store, broker=redis_url, recover=False)
    d = info["stages"]["download"]
    assert (d["expected"], d["done"], d["dead"], d["in_flight"], d["queued"], d["recovered"]) == (4, 1, 1, 1, 1, 0)
    assert d["in_flight_shards"] == [2]
    assert (d["samples_expected"], d["samples_done"], d["samples_out"]) == (20, 5, 3)
    assert d["totals"] == {"count": 5, "failed_to_download": 2, "politeness_wait_s": 0.5, "success": 3,
                           "refused": {"private address": 2}}
    assert d["failures"] == [{"shard": 1, "error": "ValueError: bad shard"}]

    out = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "status", "--store", store.uri,
                          "--broker", redis_url, "--no-recover"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "download: 1/4 shards done, 1 in flight, 1 queued, 0 recovered, 1 dead" in out.stdout
    assert "samples: 5/20 in, 3 out" in out.stdout
    assert "refused:\n" in out.stdout and "private address: 2" in out.stdout
    as_json = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "status", "--store", store.uri,
                              "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert json.loads(as_json.stdout)["stages"]["download"]["totals"]["refused"] == {"private address": 2}


def test_status_with_a_broker_recovers_a_shard_nobody_holds(tmp_path, redis_url, monkeypatch):
    monkeypatch.setenv("CLIPFLEET_SUSPECT_S", "0.5")
    store = four_shards(tmp_path)
    client = redis.Redis.from_url(redis_url)
    leases.Heartbeat(lambda: client, lambda: {(store.uri, "download", 2): "running"}, worker="w1").beat()
    # Shard 3: no message, no lease (a task acked without its shard done).
    info = collect(store, broker=redis_url, recover=True)
    d = info["stages"]["download"]
    assert d["recovered"] == 1 and d["queued"] == 1 and d["in_flight"] == 1
    assert broker_state(client, store.uri, ["download"]).queued == {("download", 3): 1}
    assert store.read_json(recovered_path("download", 3))["events"][0]["how"] == "sent the task again"
    # Looked at again, it is queued: nothing is sent twice.
    again = collect(store, broker=redis_url, recover=True)["stages"]["download"]
    assert again["recovered"] == 1 and broker_state(client, store.uri, ["download"]).queued[("download", 3)] == 1


def test_status_without_a_broker_says_what_it_cannot_know(tmp_path):
    store = four_shards(tmp_path)
    out = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "status", "--store", store.uri],
                         cwd=REPO, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "no --broker: in flight and queued unknown" in out.stdout
    assert "download: 1/4 shards done, 0 recovered, 1 dead" in out.stdout
