"""The one Celery app of the fleet: queues, routes and reliability settings.

Every setting below says why it is there. Time limits come from the environment so a test
can shrink them, but their order is checked at import: soft < hard < visibility timeout.
"""
from __future__ import annotations

import functools
import logging
import os

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from kombu import Queue

from shared.pipeline import QUEUES, Stage, TransientError, execute, next_stage, task_name
from shared.runconfig import load_cached
from shared.storage import Store

log = logging.getLogger("clipfleet.workers")

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
# Task modules, one per queue; each registers its tasks on import.
TASK_MODULES = ["workers.selfcheck", "workers.extract", "workers.download"]


def time_limits() -> tuple[int, int, int]:
    """(soft, hard, visibility) seconds; a misordered triple is refused."""
    soft = int(os.environ.get("CLIPFLEET_SOFT_TIME_LIMIT", 3000))
    hard = int(os.environ.get("CLIPFLEET_HARD_TIME_LIMIT", 3300))
    visibility = int(os.environ.get("CLIPFLEET_VISIBILITY_TIMEOUT", 3600))
    if not soft < hard < visibility:
        raise ValueError(
            f"time limits must satisfy soft < hard < visibility timeout, got {soft} / {hard} / {visibility}")
    return soft, hard, visibility


def route(name, args, kwargs, options, task=None, **kw):
    """Route by task name: clipfleet.<stage> to its stage queue, selfcheck hops to the queue they name."""
    if name.startswith("clipfleet.selfcheck."):
        return {"queue": name.rsplit(".", 1)[1]}
    stage = name.removeprefix("clipfleet.")
    if stage in QUEUES:
        return {"queue": QUEUES[stage]}
    return None


def make_app(broker: str | None = None) -> Celery:
    soft, hard, visibility = time_limits()
    app = Celery("clipfleet", broker=broker or os.environ.get("CLIPFLEET_BROKER", DEFAULT_BROKER),
                 include=[m for m in TASK_MODULES])
    app.conf.update(
        # Exactly the six queues, declared up front; a typo'd queue is an error, not a new queue.
        task_queues=[Queue(q, routing_key=q) for q in QUEUES.values()],
        task_create_missing_queues=False,
        task_default_queue=QUEUES["extract"],
        task_routes=(route,),
        # Ack after the task finishes, so a task whose worker dies is delivered again.
        task_acks_late=True,
        # A task whose pool process is killed goes back to the queue instead of failing.
        task_reject_on_worker_lost=True,
        # Hold one task at a time: shard tasks are long, prefetching starves other workers.
        worker_prefetch_multiplier=1,
        # A task that overruns gets a catchable soft signal first, then is killed.
        task_soft_time_limit=soft,
        task_time_limit=hard,
        # Redis redelivers an unacked task after this; it must outlast the hard limit, or a
        # running task would be handed to a second worker.
        # The sweep that hands back a dead worker's unacked tasks runs every ~10 s rather than
        # kombu's default ~100 s; the scan is one sorted-set range query.
        broker_transport_options={"visibility_timeout": visibility, "unacked_restore_throttle": 1},
        # Markers in the store are the results; a result backend would only grow.
        task_ignore_result=True,
        # On SIGTERM running tasks get this long to finish before they are requeued.
        worker_soft_shutdown_timeout=float(os.environ.get("CLIPFLEET_SOFT_SHUTDOWN", 30)),
        worker_enable_soft_shutdown_on_idle=True,
        # Flower needs task events.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        # A worker that cannot reach the broker should say so, not wait forever.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=int(os.environ.get("CLIPFLEET_BROKER_RETRIES", 100)),
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


app = make_app()


class ShardTask(Task):
    """Base for shard tasks: bounded retries with backoff for transient errors only,
    and a dead-letter record in the store once a shard fails for good."""

    autoretry_for = (TransientError,)
    max_retries = 5
    retry_backoff = 5
    retry_backoff_max = 300
    retry_jitter = True

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        store_uri, shard = (list(args) + [kwargs.get("store_uri"), kwargs.get("shard")])[:2]
        stage = self.name.removeprefix("clipfleet.")
        reason = "time limit" if isinstance(exc, SoftTimeLimitExceeded) else exc.__class__.__name__
        try:
            Store(store_uri).write_deadletter(stage, shard, {
                "error": f"{reason}: {exc}", "task_id": task_id, "retries": self.request.retries,
                "traceback": str(einfo)})
        except Exception:  # the dead letter is best effort; the failure is already logged
            log.exception("could not write dead letter for %s %s", stage, shard)


@functools.lru_cache(maxsize=16)
def _stage_instance(stage_cls: type[Stage], store_uri: str) -> Stage:
    # One instance per process and run, so models and clients load once, in the worker.
    return stage_cls(load_cached(store_uri))


def run_stage(stage_cls: type[Stage], store_uri: str, shard: int, **inputs) -> dict:
    """What every stage task does: run the stage once, then enqueue the next stage."""
    stage = _stage_instance(stage_cls, store_uri)
    marker = execute(stage, Store(store_uri), shard, **inputs)
    enqueue_next(stage.name, store_uri, marker["next_shards"])
    return {"shard": shard, "stats": marker["stats"], "skipped": marker.get("skipped", False)}


def enqueue_next(stage: str, store_uri: str, shards: list[int]) -> None:
    nxt = next_stage(stage)
    if nxt is None or load_cached(store_uri).until == stage:
        return
    if task_name(nxt) not in app.tasks:  # later stages are not built yet
        log.info("no %s stage in this fleet yet; %d shards stop after %s", nxt, len(shards), stage)
        return
    for shard in shards:
        app.send_task(task_name(nxt), args=(store_uri, shard))


@functools.lru_cache(maxsize=1)
def broker_redis():
    """A client to the broker's Redis, for fleet-wide state (dedup claims, politeness)."""
    import redis
    return redis.Redis.from_url(app.conf.broker_url, socket_timeout=10, socket_connect_timeout=5)
