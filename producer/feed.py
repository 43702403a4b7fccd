"""Feeding a run's first tasks to the broker, with backpressure, through broker restarts."""
from __future__ import annotations

import logging
import os
import threading
import time

from clipfleet.producer.register import FirstTask
from clipfleet.shared.stages import REGISTRY
from clipfleet.shared.storage import Store, shard_name

log = logging.getLogger("clipfleet.run")

# The producer stops enqueueing while the first queue holds this many tasks, so a crawl of
# 100k segments never sits in Redis at once.
HIGH_WATER = int(os.environ.get("CLIPFLEET_HIGH_WATER", 1000))


def queue_length(redis_client, queue: str) -> int:
    # kombu's Redis transport keeps each queue as a list named after it.
    return int(redis_client.llen(queue))


def is_broker_error(exc: Exception) -> bool:
    import kombu.exceptions
    import redis
    return isinstance(exc, (redis.RedisError, kombu.exceptions.OperationalError, ConnectionError, OSError))


def until_broker_answers(what: str, call, stop: threading.Event | None = None):
    """Call `call` until the broker answers: a feeder outlives a Redis restart."""
    delay = 0.5
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_broker_error(exc):
                raise
            log.warning("broker unreachable while %s (%s); retrying in %.0fs", what, exc, delay)
            if stop is not None and stop.wait(delay):
                raise
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, 10.0)


def enqueue(app, redis_client, store: Store, tasks: list[FirstTask], issued: set | None = None,
            stop: threading.Event | None = None) -> int:
    """Send the tasks not yet done, pausing while their queue is over the high-water mark.

    `issued` collects (stage, shard) of every task sent or found done, for the sweeper."""
    sent = 0
    for stage in dict.fromkeys(t.stage for t in tasks):
        spec = REGISTRY[stage]
        done = store.done(stage)
        for t in (t for t in tasks if t.stage == stage):
            if shard_name(t.shard) in done:
                if issued is not None:
                    issued.add((stage, t.shard))
                continue
            while until_broker_answers("checking the queue", lambda: queue_length(redis_client, spec.queue),
                                       stop) >= HIGH_WATER:
                time.sleep(1.0)
            until_broker_answers("enqueueing", lambda: app.send_task(
                spec.task_name, args=(store.uri, t.shard), kwargs=t.kwargs), stop)
            if issued is not None:
                issued.add((stage, t.shard))
            sent += 1
    return sent
