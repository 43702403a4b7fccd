"""`clipfleet retry-failed`: transient download failures fetched again in new shards, once."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.producer.fleet import free_port
from clipfleet.sandbox.hosts import TestHost
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared import layout
from clipfleet.shared.runstate import RunState
from clipfleet.shared.retries import RETRY_OFFSET, transient
from clipfleet.shared.storage import Store


def clipfleet(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CLIPFLEET_STATE_DIR": str(tmp_path / "state")})


@pytest.mark.parametrize("message, retried", [
    ("timeout: no complete response within 10s", True), ("http 503 Service Unavailable (retry after 3600s)", True),
    ("dns error: a.test: [Errno -2] Name or service not known", True), ("connection error: reset", True),
    ("connection refused: 127.0.0.1:9", True), ("http 500 oops (no time left to retry)", True),
    ("robots.txt unreachable (http 503): every URL of the host disallowed for now (RFC 9309)", True),
    ("host 127.0.0.1 asked to wait 3600s (Retry-After), over 120s", True),
    ("http 404 Not Found", False), ("disallowed by robots.txt (for clipfleet)", False),
    ("reserved by Content-Usage header: train-ai=n", False), ("blocklisted url", False),
    ("on the do-not-train list", False), ("unsupported url: ftp://x", False), (None, False),
])
def test_which_failures_are_transient(message, retried):
    assert transient(message) is retried


def _images(store: Store, shard: int) -> list[dict]:
    return pq.read_table(io.BytesIO(store.read_bytes(layout.image_shard(shard, "parquet")))).to_pylist()


@pytest.mark.timeout(600)
def test_retry_failed_recovers_a_transient_host_once_and_only_that(tmp_path):
    world = tmp_path / "world"
    make_sandbox(world, samples=12, port=free_port(), seed=5, wat_files=1)
    paths = [urlsplit(u).path for u in pq.read_table(world / "ground_truth" / "images.parquet")
             .column("url").to_pylist()][:6]
    good = TestHost(world / "web").start()
    # 500s, no Retry-After: a transient failure that leaves no fleet-wide hold behind
    flaky = TestHost(world / "web", outage_after=0, outage_s=10 ** 6, outage_status=500).start()
    closed = TestHost(world / "web", robots="User-agent: *\nDisallow: /img/\n").start()          # refuses
    try:
        urls = ([good.url + p for p in paths] + [good.url + "/img/missing.jpg"]  # a 404: permanent
                + [flaky.url + p for p in paths] + [closed.url + p for p in paths])
        source = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": [f"a picture {i}" for i in range(len(urls))]}), source)
        store_uri = str(tmp_path / "store")
        first = clipfleet(tmp_path, "run", "--urls", str(source), "--store", store_uri, "--until", "download",
                          "--allow-private-addresses")
        assert first.returncode == 0, first.stderr[-3000:]
        store = Store(store_uri)
        (shard,) = [int(n) for n in store.done("download")]
        rows = _images(store, shard)
        assert [r["status"] for r in rows].count("success") == 6
        assert all(r["status"] == "failed_to_download" for r in rows if r["url"].startswith(flaky.url))
        flaky_requests = flaky.stats[500]
        assert flaky_requests >= 1

        flaky.outage_after = None  # the host is back
        retried = clipfleet(tmp_path, "retry-failed", "--store", store_uri)
        assert retried.returncode == 0, retried.stderr[-3000:]
        assert "retrying 6 URLs of 1 shards" in retried.stdout, retried.stdout
        retry = RETRY_OFFSET + shard
        again = _images(store, retry)
        assert sorted(r["url"] for r in again) == sorted(flaky.url + p for p in paths)  # only the transient ones
        assert [r["status"] for r in again] == ["success"] * 6
        assert flaky.stats[200] == 6 and good.stats[404] == 1 and closed.stats[200] == 0  # nothing else asked again
        assert _images(store, shard) == rows  # the finished shard is never rewritten
        keys = [r["key"] for r in rows + again]
        assert len(keys) == len(set(keys))  # no key twice
        stored = [r["url"] for r in rows + again if r["status"] == "success"]
        assert len(stored) == len(set(stored)) == 12  # each image stored once
        assert {shard, retry} == {int(n) for n in RunState(store).stage("download").expected}

        twice = clipfleet(tmp_path, "retry-failed", "--store", store_uri)
        assert twice.returncode == 0 and "nothing to retry" in twice.stdout, twice.stdout
        assert flaky.stats[200] == 6 and store.done("download") == {f"{shard:05d}", str(retry)}
    finally:
        for host in (good, flaky, closed):
            host.stop()
