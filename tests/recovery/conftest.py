"""Fault tests with real processes: an external redis-server with AOF that a test stops and
starts again, `clipfleet worker` nodes, and `clipfleet run --urls ... --broker ...` on a
sandbox web that drips some images slowly, so a shard is held long enough to be hit mid-task.

Recovery timings are shrunk through the environment (lease 4 s, suspect 3 s, sweep 1 s);
the broker's visibility timeout stays at its default hour, so only the fleet's own recovery
can bring a lost shard back before the tests' timeouts.
"""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.producer.fleet import check_broker, find_redis_server, free_port
from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared.storage import Store
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "clipfleet.producer.cli"]

RECOVERY_ENV = {
    "CLIPFLEET_LEASE_S": "4", "CLIPFLEET_SUSPECT_S": "3", "CLIPFLEET_SWEEP_S": "1",
    "CLIPFLEET_SOFT_SHUTDOWN": "2", "CLIPFLEET_RETRY_BACKOFF": "1",
    "CLIPFLEET_LOG_LEVEL": "INFO",
}


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("world")
    make_sandbox(directory, samples=40, port=free_port(), seed=5, wat_files=1)
    return directory


@pytest.fixture(scope="session")
def web(world):
    with SandboxServer(world) as server:
        yield server


@pytest.fixture(scope="session")
def drip_hosts(world, web):
    """The same web on 127.0.0.2 ... 127.0.0.41: one host per slow drip, so a drip's timeout
    slows only the pace of a host nothing else uses (politeness adapts per host)."""
    servers = [SandboxServer(world, host=f"127.0.0.{k}", port=0).start() for k in range(2, 42)]
    yield [s.url for s in servers]
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def images(world) -> list[str]:
    return pq.read_table(world / "ground_truth" / "images.parquet").column("url").to_pylist()


class Redis:
    """A redis-server with AOF on a fixed port and directory, stopped and started by the test."""

    def __init__(self, directory: Path):
        self.dir, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        wait_until(lambda: _answers(self.url), 20, "redis-server")

    def stop(self) -> None:
        """SIGTERM, as an operator's restart does: Redis finishes its AOF and exits."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        self.proc = None


def _answers(url: str) -> bool:
    try:
        check_broker(url, 0.5)
        return True
    except Exception:
        return False


@pytest.fixture
def redis_aof(tmp_path):
    server = Redis(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    yield server
    if server.proc is not None:
        server.proc.terminate()
        server.proc.wait(10)


@dataclass
class Fleet:
    """`clipfleet worker` nodes and one `clipfleet run`, each in its own process group."""
    tmp: Path
    broker: str
    env: dict
    workers: list[subprocess.Popen] = field(default_factory=list)
    run_proc: subprocess.Popen | None = None

    def worker(self, concurrency: int = 2) -> subprocess.Popen:
        log = open(self.tmp / f"worker-{len(self.workers)}.log", "ab")
        proc = subprocess.Popen(CLI + ["worker", "--queues", "cpu-download", "--broker", self.broker,
                                       "--concurrency", str(concurrency)],
                                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.workers.append(proc)
        return proc

    def run(self, urls_file: Path, store_uri: str, shard_size: int, *extra: str) -> subprocess.Popen:
        self.run_log = self.tmp / "run.log"
        self.run_proc = subprocess.Popen(
            CLI + ["run", "--urls", str(urls_file), "--store", store_uri, "--broker", self.broker,
                   "--until", "download", "--allow-private-addresses", "--shard-size", str(shard_size),
                   "--download-timeout", "2", "--download-threads", "1", "--download-retries", "0",
                   "--domain-max-rate", "0", "--domain-max-concurrency", "64", *extra],
            cwd=REPO, env=self.env, stdout=open(self.run_log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        return self.run_proc

    def wait_run(self, timeout: float) -> tuple[int, str]:
        try:
            code = self.run_proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not end in {timeout:.0f}s:\n{self.logs()}") from None
        return code, self.run_log.read_text()

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-6000:]}" for p in sorted(self.tmp.glob("*.log")))

    def stop(self) -> None:
        for proc in self.workers + ([self.run_proc] if self.run_proc else []):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)


@pytest.fixture
def fleet(tmp_path, redis_aof, monkeypatch):
    env = {**os.environ, **RECOVERY_ENV}
    logs = tmp_path / "logs"
    logs.mkdir()
    f = Fleet(logs, redis_aof.url, env)
    yield f
    f.stop()


def url_list(tmp_path: Path, images: list[str], drip_hosts: list[str], shards: int, good: int, slow: int) -> Path:
    """`shards` shards, each of `good` images and `slow` slow drips (each holds a fetch thread
    for the whole --download-timeout): a shard takes about slow x timeout seconds."""
    rows, hosts = [], iter(drip_hosts)
    for s in range(shards):
        rows += [images[(s * good + i) % len(images)] for i in range(good)]
        rows += [f"{next(hosts)}/corner/slow-drip.jpg" for _ in range(slow)]
    table = pa.table({"url": rows, "caption": [f"caption {i}" for i in range(len(rows))]})
    path = tmp_path / "urls.parquet"
    pq.write_table(table, path)
    return path


def shards_in_flight(store: Store, broker: str) -> int:
    """Tasks delivered to a worker and not acked yet, as kombu keeps them (so the same test
    runs against a fleet without leases), once each has had a moment to start."""
    import redis
    client = redis.Redis.from_url(broker)
    started = [t for t in client.zrange("unacked_index", 0, -1, withscores=True) if time.time() - t[1] > 1.0]
    return len(started)


def finished_runs(tmp: Path) -> dict[int, int]:
    """Shard -> how many times a worker ran it to the end (not skipped), from every worker log."""
    counts: dict[int, int] = {}
    for log in tmp.glob("worker-*.log"):
        for shard in re.findall(r"succeeded in [\d.]+s: \{'shard': (\d+),.*'skipped': False\}", log.read_text()):
            counts[int(shard)] = counts.get(int(shard), 0) + 1
    return counts


def check_complete(store: Store, shards: int, rows_per_shard: int, tmp: Path) -> None:
    """Every shard done once, every sample in it exactly once, no dead letter."""
    assert store.done("download") == {f"{s:05d}" for s in range(shards)}
    assert store.deadletters("download") == []
    keys = []
    for s in range(shards):
        table = pq.read_table(io.BytesIO(store.read_bytes(f"images/{s:05d}.parquet")))
        assert table.num_rows == rows_per_shard
        keys += table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == shards * rows_per_shard
    assert finished_runs(tmp) == {s: 1 for s in range(shards)}
