"""The one Celery app of the fleet: queues, routes and reliability settings.

Every setting below says why it is there. Time limits come from the environment so a test
can shrink them, but their order is checked at import: soft < hard < visibility timeout.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

from celery import Celery, Task, signals
from celery.exceptions import SoftTimeLimitExceeded
from kombu import Queue

from clipfleet.shared.pipeline import QUEUES, TASK_MODULES, TransientError
from clipfleet.shared.storage import Store

log = logging.getLogger("clipfleet.workers")

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
SELFCHECK_MODULE = "clipfleet.workers.selfcheck"  # a no-op hop per queue, every worker serves it


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
    # No `include`: a worker imports the task modules of the queues it serves (below), so a
    # download worker never loads torch and the producer imports no stage at all.
    app = Celery("clipfleet", broker=broker or os.environ.get("CLIPFLEET_BROKER", DEFAULT_BROKER))
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


def task_modules(queues) -> list[str]:
    """The modules a worker serving `queues` imports (all of them when it serves every queue)."""
    wanted = set(QUEUES.values()) if not queues else set(queues)
    return [SELFCHECK_MODULE] + [TASK_MODULES[s] for s, q in QUEUES.items() if q in wanted and s in TASK_MODULES]


@signals.celeryd_init.connect
def _import_served_stages(sender=None, conf=None, options=None, **kw):
    # Runs in the worker before it loads task modules: include only the served queues' stages.
    queues = (options or {}).get("queues") or []
    if isinstance(queues, str):
        queues = queues.split(",")
    # (Importing here rather than setting conf.include: the loader has read include already.)
    for module in task_modules([q.strip() for q in queues if q.strip()]):
        importlib.import_module(module)


@functools.lru_cache(maxsize=1)
def broker_redis():
    """A client to the broker's Redis, for fleet-wide state (dedup claims, politeness)."""
    import redis
    return redis.Redis.from_url(app.conf.broker_url, socket_timeout=10, socket_connect_timeout=5)
