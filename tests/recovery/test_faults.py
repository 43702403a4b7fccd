"""A run survives a Redis restart, a SIGKILLed node, a scale-down and a long broker outage by
itself: it ends with every shard done once, no key twice, no dead letter.

Before the leases, the sweeper and the retry that is never dropped, each of these runs hung
(the tests' timeouts end them): a retry Celery could not publish was acked and lost, a dead
node's tasks waited for the hour-long visibility timeout, SIGTERM waited for running tasks.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from clipfleet.shared.storage import Store
from tests.helpers import wait_until
from tests.recovery.conftest import check_complete, shards_in_flight, url_list

GOOD, SLOW = 4, 3          # a shard: 4 images, then 3 slow drips of 2 s each
ROWS = GOOD + SLOW


def start(fleet, tmp_path, drip_hosts, images, shards: int, slow: int = SLOW, workers: int = 1, concurrency: int = 2):
    urls = url_list(tmp_path, images, drip_hosts, shards, GOOD, slow)
    store_uri = str(tmp_path / "store")
    nodes = [fleet.worker(concurrency) for _ in range(workers)]
    fleet.run(urls, store_uri, GOOD + slow)
    return Store(store_uri), nodes


@pytest.mark.timeout(300)
def test_redis_restart_mid_run_loses_nothing(tmp_path, fleet, redis_aof, drip_hosts, images):
    store, _ = start(fleet, tmp_path, drip_hosts, images, shards=8)
    wait_until(lambda: shards_in_flight(store, redis_aof.url) >= 2, 120, "two shards in flight")
    redis_aof.stop()
    time.sleep(10)  # down for longer than a lease lives
    redis_aof.start()
    code, out = fleet.wait_run(240)
    assert code == 0, fleet.logs()
    assert "download: 8 done, 0 failed" in out
    check_complete(store, 8, ROWS, fleet.tmp)


@pytest.mark.timeout(300)
def test_sigkilled_node_shards_come_back_without_the_visibility_timeout(tmp_path, fleet, redis_aof, drip_hosts, images):
    store, [node] = start(fleet, tmp_path, drip_hosts, images, shards=6, slow=4)
    wait_until(lambda: shards_in_flight(store, redis_aof.url) >= 2, 120, "two shards in flight")
    os.killpg(node.pid, signal.SIGKILL)  # the whole node: worker and pool processes
    node.wait(10)
    held = {n for n in (f"{s:05d}" for s in range(6))} - store.done("download")
    assert len(held) >= 2
    fleet.worker()  # a fresh node at once; Redis would hand the dead node's tasks back in an hour
    code, out = fleet.wait_run(240)
    assert code == 0, fleet.logs()
    assert "recovered" in out  # the run says it brought shards back
    check_complete(store, 6, GOOD + 4, fleet.tmp)


@pytest.mark.timeout(300)
def test_sigterm_requeues_running_shards_after_the_soft_shutdown(tmp_path, fleet, redis_aof, drip_hosts, images):
    # Shards of 6 slow drips take 12 s or more; the soft shutdown is 2 s.
    store, [node] = start(fleet, tmp_path, drip_hosts, images, shards=4, slow=6)
    wait_until(lambda: shards_in_flight(store, redis_aof.url) >= 2, 120, "two shards in flight")
    node.send_signal(signal.SIGTERM)  # what a scale-down sends to the worker (PID 1 of its pod)
    node.wait(10)  # a warm shutdown would wait the 12 s the shards still need: this times out
    assert store.done("download") == set()  # it finished nothing: its two shards went back
    fleet.worker()
    code, out = fleet.wait_run(240)
    assert code == 0, fleet.logs()
    check_complete(store, 4, GOOD + 6, fleet.tmp)
    assert "Restoring 2 unacknowledged message(s)" in (fleet.tmp / "worker-0.log").read_text()


@pytest.mark.timeout(300)
def test_broker_away_longer_than_the_retry_budget(tmp_path, fleet, redis_aof, drip_hosts, images):
    # Workers try to publish a retry for 2 s, then requeue; Redis stays away for 12 s, so the
    # requeue cannot reach it either and the messages stay unacked until the sweeper finds them.
    fleet.env["CLIPFLEET_RETRY_PUBLISH_S"] = "2"
    store, _ = start(fleet, tmp_path, drip_hosts, images, shards=6)
    wait_until(lambda: shards_in_flight(store, redis_aof.url) >= 2, 120, "two shards in flight")
    redis_aof.stop()
    time.sleep(12)
    redis_aof.start()
    code, out = fleet.wait_run(240)
    assert code == 0, fleet.logs()
    check_complete(store, 6, ROWS, fleet.tmp)
    assert "could not be published" in (fleet.tmp / "worker-0.log").read_text()


@pytest.mark.timeout(300)
def test_a_detached_run_is_swept_by_the_fleet(tmp_path, fleet, redis_aof, drip_hosts, images):
    # Nobody follows a --detach'ed run: the workers themselves bring a dead node's shards back.
    urls = url_list(tmp_path, images, drip_hosts, 6, GOOD, 4)
    store = Store(str(tmp_path / "store"))
    node = fleet.worker()
    fleet.run(urls, store.uri, GOOD + 4, "--detach")
    code, out = fleet.wait_run(120)
    assert code == 0 and "enqueued 6 download tasks" in out, out
    wait_until(lambda: shards_in_flight(store, redis_aof.url) >= 2, 120, "two shards in flight")
    os.killpg(node.pid, signal.SIGKILL)
    node.wait(10)
    fleet.worker()
    wait_until(lambda: len(store.done("download")) == 6, 240, "every shard done")
    check_complete(store, 6, GOOD + 4, fleet.tmp)
