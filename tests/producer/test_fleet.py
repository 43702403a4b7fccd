"""Real processes: `clipfleet up`, a chain through all six queues, Flower, shutdown, SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from clipfleet.producer.fleet import Fleet, state_dir
from clipfleet.workers.registry import REGISTRY

QUEUES = REGISTRY.queues()
from clipfleet.shared.storage import Store
from tests.helpers import wait_until
from clipfleet.workers.app import make_app

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "clipfleet.producer.cli"]




def read_until(proc: subprocess.Popen, prefix: str, lines: list[str], timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"`up` exited early (code {proc.poll()}): {''.join(lines)}")
        lines.append(line)
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise AssertionError(f"no {prefix!r} line: {''.join(lines)}")


def test_up_chains_through_all_queues_shows_flower_and_stops_clean(store_uri, isolated_state):
    proc = subprocess.Popen(CLI + ["up", "--store", store_uri], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    lines: list[str] = []
    try:
        broker = read_until(proc, "broker: ", lines)
        flower = read_until(proc, "flower: ", lines)
        user, password = read_until(proc, "flower login: ", lines).split(" / ")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 8  # redis, flower, six workers (and their pool processes)

        make_app(broker).send_task(f"clipfleet.selfcheck.{QUEUES['extract']}", args=(store_uri, 42))
        store = Store(store_uri)
        hops = [f"selfcheck-{q}" for q in QUEUES.values()]
        wait_until(lambda: all(store.marker(h, 42) for h in hops), 120, "all six hops")
        for hop in hops:
            assert store.done(hop) == {"00042"}

        assert requests.get(f"{flower}/api/workers", timeout=10).status_code == 401
        # One refresh lists only the workers that answered Flower's inspect broadcast in time; on a
        # loaded machine some answer late, so ask again until all six have (the bound is no speed test).
        workers = wait_until(lambda: (answer := requests.get(f"{flower}/api/workers?refresh=1", auth=(user, password),
                                                             timeout=10).json()) and len(answer) >= 6 and answer,
                             60, "flower workers")
        queues_seen = {q["name"] for w in workers.values() for q in w.get("active_queues", [])}
        assert len(workers) == 6 and queues_seen == set(QUEUES.values())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + out
    assert "stopped" in out
    time.sleep(0.5)
    assert [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []


def _attempts(store: Store, stage: str) -> list[str]:
    return store.list(f"_attempts/{stage}")


@pytest.fixture
def short_limits(monkeypatch):
    # Small limits so Redis hands back the unacked task of a dead node within seconds.
    monkeypatch.setenv("CLIPFLEET_SOFT_TIME_LIMIT", "12")
    monkeypatch.setenv("CLIPFLEET_HARD_TIME_LIMIT", "14")
    monkeypatch.setenv("CLIPFLEET_VISIBILITY_TIMEOUT", "16")


def test_sigkilled_worker_task_runs_again_on_a_fresh_worker(tmp_path, isolated_state, short_limits):
    store_uri, stage = str(tmp_path / "store"), "selfcheck-cpu-extract"
    store = Store(store_uri)
    fleet = Fleet()
    try:
        fleet.start_redis(state_dir("kill-test"))
        first = fleet.start_worker(["cpu-extract"], concurrency=1)
        fleet.wait_for_workers(1)
        make_app(fleet.broker).send_task("clipfleet.selfcheck.cpu-extract", args=(store_uri, 1),
                                         kwargs={"hold_s": 4.0})
        wait_until(lambda: _attempts(store, stage), 60, "the first attempt")
        os.killpg(first.pid, signal.SIGKILL)  # the whole node dies while it holds the task
        first.wait()
        assert store.marker(stage, 1) is None

        fleet.start_worker(["cpu-extract"], concurrency=1)
        marker = wait_until(lambda: store.marker(stage, 1), 120, "the redelivered task")
        attempts = _attempts(store, stage)
        assert len(attempts) == 2
        assert f"1-{marker['pid']}.json" in attempts  # the second, fresh process finished it
        assert store.done(stage) == {"00001"}
    finally:
        fleet.stop(grace=5)


def test_sigkilled_pool_process_task_is_requeued_at_once(tmp_path, isolated_state):
    store_uri, stage = str(tmp_path / "store"), "selfcheck-cpu-extract"
    store = Store(store_uri)
    fleet = Fleet()
    try:
        fleet.start_redis(state_dir("pool-kill-test"))
        fleet.start_worker(["cpu-extract"], concurrency=1)
        fleet.wait_for_workers(1)
        make_app(fleet.broker).send_task("clipfleet.selfcheck.cpu-extract", args=(store_uri, 2),
                                         kwargs={"hold_s": 4.0})
        [attempt] = wait_until(lambda: _attempts(store, stage), 60, "the first attempt")
        os.kill(int(attempt.split("-")[1].removesuffix(".json")), signal.SIGKILL)
        marker = wait_until(lambda: store.marker(stage, 2), 60, "the requeued task")
        assert len(_attempts(store, stage)) == 2
        assert f"2-{marker['pid']}.json" != attempt
    finally:
        fleet.stop(grace=5)


def test_broker_idle_only_when_no_message_waits_or_is_unacked(redis_url):
    import redis
    from clipfleet.producer.fleet import broker_idle
    client = redis.Redis.from_url(redis_url)
    assert broker_idle(redis_url, settle_s=0)
    client.lpush("cpu-download", b"{}")
    assert not broker_idle(redis_url, settle_s=0)
    client.delete("cpu-download")
    client.lpush("gpu-clip\x06\x163", b"{}")  # a priority queue of kombu's
    assert not broker_idle(redis_url, settle_s=0)
    client.delete("gpu-clip\x06\x163")
    client.hset("unacked", "tag", b"[]")  # delivered to a worker, not acked yet
    assert not broker_idle(redis_url, settle_s=0)
    client.hdel("unacked", "tag")
    assert broker_idle(redis_url, settle_s=0)


def _restarted(key: str):
    """A fresh embedded Redis on `key`'s state dir: what the stopped one left there."""
    import redis
    fleet = Fleet()
    fleet.start_redis(state_dir(key))
    return fleet, redis.Redis.from_url(fleet.broker)


def test_stop_idle_kills_an_idle_fleet_and_redis_keeps_its_data(isolated_state):
    import redis
    fleet = Fleet()
    try:
        fleet.start_redis(state_dir("idle-stop"))
        workers = [fleet.start_worker(["cpu-extract"], concurrency=1)]
        fleet.wait_for_workers(1)
        redis.Redis.from_url(fleet.broker).set("claim", b"kept")
        assert fleet.stop_idle()
        assert all(p.poll() is not None for p in workers) and not fleet.procs
    finally:
        fleet.stop(grace=5)
    again, client = _restarted("idle-stop")
    try:
        assert client.get("claim") == b"kept"  # Redis was stopped cleanly: its append-only file is whole
    finally:
        again.stop(grace=5)


def test_stop_idle_leaves_a_fleet_with_work_to_the_graceful_stop(isolated_state):
    import redis
    fleet = Fleet()
    try:
        fleet.start_redis(state_dir("busy-stop"))
        fleet.start_worker(["cpu-extract"], concurrency=1)
        fleet.wait_for_workers(1)
        redis.Redis.from_url(fleet.broker).lpush("gpu-clip", b"a task nobody here serves")
        assert not fleet.stop_idle(settle_s=0.1)
        assert not fleet.procs
    finally:
        fleet.stop(grace=5)
    again, client = _restarted("busy-stop")
    try:
        assert client.lrange("gpu-clip", 0, -1) == [b"a task nobody here serves"]
    finally:
        again.stop(grace=5)
