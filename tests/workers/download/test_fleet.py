"""Real processes: `clipfleet run --urls ... --until download`, and a worker SIGKILLed mid-shard."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis

from clipfleet.producer.fleet import Fleet, state_dir
from clipfleet.shared.pipeline import execute
from clipfleet.shared.storage import Store
from tests.helpers import wait_until
from tests.workers.download.conftest import make_run, make_stage, url_table, write_url_shard
from clipfleet.workers.app import make_app

REPO = Path(__file__).resolve().parents[3]




@pytest.mark.timeout(300)
def test_clipfleet_run_urls_until_download_does_img2datasets_job(tmp_path, isolated_state, sandbox, truth):
    urls = truth.column("url").to_pylist()[:30] + [sandbox.url + "/corner/missing.jpg"]
    table = url_table(urls).rename_columns(["URL", "TEXT", "page_url", "language", "language_score", "uid"])
    pq.write_table(table, tmp_path / "laion.parquet")
    store_uri = str(tmp_path / "store")
    proc = subprocess.run(
        [sys.executable, "-m", "clipfleet.producer.cli", "run", "--urls", str(tmp_path / "laion.parquet"),
         "--store", store_uri, "--until", "download", "--allow-private-addresses",
         "--url-col", "URL", "--caption-col", "TEXT", "--shard-size", "16", "--download-timeout", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "download: 2 done, 0 failed" in proc.stdout
    store = Store(store_uri)
    assert store.list("images") == ["00000.parquet", "00000.tar", "00000_stats.json",
                                    "00001.parquet", "00001.tar", "00001_stats.json"]
    rows = [r for n in ("00000", "00001")
            for r in pq.read_table(io.BytesIO(store.read_bytes(f"images/{n}.parquet"))).to_pylist()]
    assert [r["url"] for r in rows] == urls
    assert [r["status"] for r in rows] == ["success"] * 30 + ["failed_to_download"]
    assert rows[-1]["key"] == "0000114" and "404" in rows[-1]["error_message"]


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.mark.timeout(300)
def test_worker_killed_mid_shard_leaves_nothing_and_the_redelivered_shard_is_identical(
        tmp_path, isolated_state, monkeypatch, redis_url, sandbox, truth):
    # Small limits so Redis hands the unacked task of the dead node back within seconds.
    monkeypatch.setenv("CLIPFLEET_SOFT_TIME_LIMIT", "12")
    monkeypatch.setenv("CLIPFLEET_HARD_TIME_LIMIT", "14")
    monkeypatch.setenv("CLIPFLEET_VISIBILITY_TIMEOUT", "16")
    images = truth.column("url").to_pylist()
    # The slow drip keeps the task busy for its whole deadline (3 s), then ends as a timeout.
    urls = images[:20] + [sandbox.url + "/corner/slow-drip.jpg"] + images[20:30]
    options = {"download_timeout": 3.0}

    reference_uri = str(tmp_path / "reference")
    make_run(reference_uri, **options)
    write_url_shard(Store(reference_uri), 5, url_table(urls))
    execute(make_stage(make_run(reference_uri, **options), redis_url), Store(reference_uri), 5)

    store_uri = str(tmp_path / "store")
    store = Store(store_uri)
    make_run(store_uri, **options)
    write_url_shard(store, 5, url_table(urls))
    fleet = Fleet(log_dir=tmp_path)
    try:
        fleet.start_redis(state_dir("download-kill-test"))
        first = fleet.start_worker(["cpu-download"], concurrency=1)
        fleet.wait_for_workers(1)
        make_app(fleet.broker).send_task("clipfleet.download", args=(store_uri, 5))
        slots = broker = redis.Redis.from_url(fleet.broker)
        # Mid-shard: the worker holds a per-host slot for the slow drip.
        wait_until(lambda: slots.zcard("clipfleet:polite:slots:127.0.0.1"), 120, "the shard in progress")
        os.killpg(first.pid, signal.SIGKILL)  # the whole node dies while it holds the task
        first.wait()
        assert store.list("images") == [] and store.marker("download", 5) is None

        # kombu hands an unacked task back once it is older than the visibility timeout, and
        # a worker sweeps for such tasks as it starts (later only every ~100 s): so the fresh
        # worker starts once the task's delivery is older than that timeout.
        [(_, delivered_at)] = broker.zrange("unacked_index", 0, -1, withscores=True)
        time.sleep(max(0.0, delivered_at + 16 + 0.5 - time.time()))
        fleet.start_worker(["cpu-download"], concurrency=1)
        wait_until(lambda: store.marker("download", 5), 150, "the redelivered shard")
    finally:
        fleet.stop(grace=5)

    reference = Store(reference_uri)
    assert store.list("images") == reference.list("images") == ["00005.parquet", "00005.tar", "00005_stats.json"]
    ours = pq.read_table(io.BytesIO(store.read_bytes("images/00005.parquet"))).to_pylist()
    theirs = pq.read_table(io.BytesIO(reference.read_bytes("images/00005.parquet"))).to_pylist()
    assert ours == theirs
    assert ours[20]["status"] == "failed_to_download" and "timeout" in ours[20]["error_message"]
    assert tar_members(store.read_bytes("images/00005.tar")) == tar_members(reference.read_bytes("images/00005.tar"))
    assert store.read_bytes("images/00005.tar") == reference.read_bytes("images/00005.tar")
    # Done once: the fresh worker ran it, nobody ran it again after the marker.
    log = (tmp_path / "worker-cpu-download.log").read_text()
    assert log.count("succeeded in") == 1 and "'skipped': False" in log
