"""Monitoring with real processes: Flower behind auth with no secret on a command line, and the
queue metrics that count reserved (unacked) tasks beside waiting ones."""
from __future__ import annotations

import json
import threading

import psutil
import redis
import requests

from clipfleet.producer.fleet import Fleet, free_port
from clipfleet.producer.metrics import QueueMetrics, queue_counts, serve
from clipfleet.workers.registry import REGISTRY

QUEUES = REGISTRY.queues()
from tests.helpers import wait_until


def test_flower_needs_its_login_and_no_process_shows_a_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFLEET_FLOWER_PASSWORD", "s3cret-Flower-pw")
    fleet = Fleet(log_dir=tmp_path)
    try:
        fleet.start_redis(tmp_path)
        fleet.start_worker(["cpu-download"])
        url = fleet.start_flower()
        assert requests.get(f"{url}/api/workers", timeout=10).status_code == 401
        ok = requests.get(f"{url}/api/workers", auth=fleet.flower_auth, timeout=10)
        assert ok.status_code == 200
        for _, proc in fleet.procs:
            tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
            for p in tree:
                assert "s3cret-Flower-pw" not in " ".join(p.cmdline())
    finally:
        fleet.stop(grace=10)


def test_queue_metrics_count_waiting_and_reserved(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.rpush("cpu-download", "m1", "m2", "m3")
    # kombu keeps a delivered, unacked message in the `unacked` hash as [message, exchange, routing key]
    client.hset("unacked", "tag-1", json.dumps([{"body": "x"}, "", "gpu-clip"]))
    client.hset("unacked", "tag-2", json.dumps([{"body": "y"}, "", "gpu-clip"]))
    client.hset("unacked", "junk", "not json")
    counts = queue_counts(client)
    assert counts["cpu-download"] == (3, 0)
    assert counts["gpu-clip"] == (0, 2)
    assert set(counts) == set(QUEUES.values())

    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=serve, args=(redis_url, "127.0.0.1", port, 0.2, stop), daemon=True)
    thread.start()
    try:
        def scraped():
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.ConnectionError:
                return None
            return text if 'clipfleet_queue_load{queue="gpu-clip"} 2.0' in text else None
        text = wait_until(scraped, 20, "the exporter to serve the counts")
        assert 'clipfleet_queue_waiting{queue="cpu-download"} 3.0' in text
        assert 'clipfleet_queue_reserved{queue="gpu-clip"} 2.0' in text
        assert "clipfleet_broker_up 1.0" in text
    finally:
        stop.set()
        thread.join(10)


def test_broker_away_is_reported_not_raised():
    metrics = QueueMetrics(redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5))
    metrics.refresh()
    assert metrics.up._value.get() == 0
