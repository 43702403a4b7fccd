"""The one Celery app of the fleet: queues, routes and reliability settings.

Every setting below says why it is there. Time limits come from the environment so a test
can shrink them, but their order is checked at import: soft < hard < visibility timeout.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
import time

import kombu.exceptions
import redis.exceptions
from celery import Celery, Task, signals
from celery.exceptions import Reject, SoftTimeLimitExceeded
from kombu import Queue

from clipfleet.shared import leases
from clipfleet.shared.layout import RUN_FILE
from clipfleet.shared.pipeline import TransientError
from clipfleet.shared.runindex import RunIndex
from clipfleet.shared.stages import REGISTRY
from clipfleet.shared.storage import Store, unreachable_errors
from clipfleet.workers.limits import time_limits

log = logging.getLogger("clipfleet.workers")

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
SELFCHECK_MODULE = "clipfleet.workers.selfcheck"  # a no-op hop per queue, every worker serves it


def soft_shutdown_s() -> float:
    return float(os.environ.get("CLIPFLEET_SOFT_SHUTDOWN", 30))


def route(name, args, kwargs, options, task=None, **kw):
    """Route by task name: clipfleet.<stage> to its stage queue, selfcheck hops to the queue they name."""
    if name.startswith("clipfleet.selfcheck."):
        return {"queue": name.rsplit(".", 1)[1]}
    stage = name.removeprefix("clipfleet.")
    if stage in REGISTRY:
        return {"queue": REGISTRY[stage].queue}
    once = REGISTRY.run_once().get(stage)
    return {"queue": once[0].queue} if once else None


def make_app(broker: str | None = None) -> Celery:
    soft, hard, visibility = time_limits()
    # No `include`: a worker imports the task modules of the queues it serves (below), so a
    # download worker never loads torch and the producer imports no stage at all.
    app = Celery("clipfleet", broker=broker or os.environ.get("CLIPFLEET_BROKER", DEFAULT_BROKER))
    app.conf.update(
        # Exactly the registry's queues, declared up front; a typo'd queue is an error, not a new queue.
        task_queues=[Queue(q, routing_key=q) for q in REGISTRY.queue_names()],
        task_create_missing_queues=False,
        task_default_queue=REGISTRY.queue_names()[0],
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
        # running task would be handed to a second worker. It is only the last resort: a dead
        # worker's tasks come back through the leases and the sweeper (shared/leases.py) in
        # about 35 s. The throttle makes kombu check for overdue tasks on every poll.
        broker_transport_options={"visibility_timeout": visibility, "unacked_restore_throttle": 1},
        # Markers in the store are the results; a result backend would only grow.
        task_ignore_result=True,
        # On SIGTERM running tasks get this long to finish, then are cancelled and go back to
        # the queue (kombu restores a closing channel's unacked messages). This needs SIGTERM
        # to mean Celery's cold shutdown: REMAP_SIGTERM=SIGQUIT in the worker's environment,
        # which producer/fleet.py sets for every worker it starts. A plain SIGTERM is a warm
        # shutdown that waits for running tasks however long they take.
        worker_soft_shutdown_timeout=soft_shutdown_s(),
        # An idle worker stops at once instead of sleeping out the soft shutdown time.
        worker_enable_soft_shutdown_on_idle=False,
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

    # A lost connection to Redis (the broker, politeness, dedup claims) is transient wherever
    # it is raised: a Redis restart must not dead-letter the shards in flight.
    # So is a store out of reach (S3 refusing connections while it restarts or the network is
    # partitioned): without it, a 30 s outage dead-letters every shard in flight.
    autoretry_for = (TransientError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                     kombu.exceptions.OperationalError, *unreachable_errors())
    max_retries = int(os.environ.get("CLIPFLEET_MAX_RETRIES", 5))
    retry_backoff = int(os.environ.get("CLIPFLEET_RETRY_BACKOFF", 5))
    retry_backoff_max = 300
    retry_jitter = True

    def retry(self, *args, **kwargs):
        """Celery's retry, except that a retry which cannot be published is not dropped.

        Celery turns a failed publish (broker away) into Reject(requeue=False), which acks the
        message: the shard is lost. Here the publish is tried again for CLIPFLEET_RETRY_PUBLISH_S
        (the broker usually comes back); after that the message is rejected *with* requeue,
        and if even that cannot reach the broker it stays unacked in Redis, where the sweeper
        finds it once this worker's lease on it has lapsed (shared/leases.py)."""
        deadline = time.monotonic() + retry_publish_s()
        delay = 0.5
        while True:
            try:
                return super().retry(*args, **kwargs)
            except Reject as rejected:
                if rejected.requeue:
                    raise
                if time.monotonic() >= deadline:
                    log.warning("%s %s: the retry could not be published (%s); requeueing it",
                                self.name, self.request.args, rejected.reason)
                    raise Reject(rejected.reason, requeue=True) from None
                log.warning("%s %s: the retry could not be published (%s); trying again in %.1fs",
                            self.name, self.request.args, rejected.reason, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        store_uri, shard = (list(args) + [kwargs.get("store_uri"), kwargs.get("shard")])[:2]
        stage = self.name.removeprefix("clipfleet.")
        reason = "time limit" if isinstance(exc, SoftTimeLimitExceeded) else exc.__class__.__name__
        try:
            store = Store(store_uri)
            store.write_deadletter(stage, shard, {
                "error": f"{reason}: {exc}", "task_id": task_id, "retries": self.request.retries,
                "traceback": str(einfo)})
            RunIndex(broker_redis(), store_uri, store.read_json(RUN_FILE)["created_at"]).record_failed(stage, shard)
        except Exception:
            # The message is acked regardless; the sweeper sees a shard that is neither done,
            # dead-lettered nor queued and sends it again (counted as recovered).
            log.exception("could not write dead letter for %s %s", stage, shard)


def retry_publish_s() -> float:
    """How long a worker keeps trying to publish a retry before it requeues the task instead."""
    return float(os.environ.get("CLIPFLEET_RETRY_PUBLISH_S", 60))


def served_stages(queues) -> list:
    """The stage specs a worker serving `queues` runs (all of them when it serves every queue)."""
    wanted = set(REGISTRY.queue_names()) if not queues else set(queues)
    return [spec for spec in REGISTRY if spec.queue in wanted]


@signals.celeryd_init.connect
def _register_served_stages(sender=None, conf=None, options=None, **kw):
    # Runs in the worker before it consumes: register only the served queues' stage tasks, so a
    # download worker never imports the clip stage (and torch).
    from clipfleet.workers.tasks import register_tasks
    queues = (options or {}).get("queues") or []
    if isinstance(queues, str):
        queues = queues.split(",")
    importlib.import_module(SELFCHECK_MODULE)
    for spec in served_stages([q.strip() for q in queues if q.strip()]):
        register_tasks(spec)


@functools.lru_cache(maxsize=1)
def broker_redis():
    """A client to the broker's Redis, for fleet-wide state (dedup claims, politeness)."""
    import redis
    return redis.Redis.from_url(app.conf.broker_url, socket_timeout=10, socket_connect_timeout=5)


# -- shard leases (shared/leases.py): renewed from the worker's main process -------------------
def held_shards() -> dict:
    """{(store_uri, stage, shard): state} for every shard task this worker holds."""
    from celery.worker import state
    groups = (("scheduled", state.scheduled_requests), ("reserved", state.reserved_requests),
              ("running", state.active_requests))
    for _ in range(5):
        try:  # the event loop changes these sets while we read them
            held = {}
            for name, requests in groups:
                for req in tuple(requests):
                    shard = leases.shard_of_task(req.name, req.args, req.kwargs)
                    if shard is not None:
                        held[shard] = name
            return held
        except RuntimeError:
            time.sleep(0.01)
    raise RuntimeError("worker state kept changing while reading it")


_heartbeat: leases.Heartbeat | None = None


@signals.worker_ready.connect
def _start_heartbeat(sender=None, **kw):
    global _heartbeat
    import redis
    url = app.conf.broker_url
    _heartbeat = leases.Heartbeat(
        lambda: redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3),
        held_shards, worker=f"{getattr(sender, 'hostname', None) or 'worker'}:{os.getpid()}")
    _heartbeat.start()


_fleet_sweeper_stop = None


def _fleet_sweeper_loop(holder: str, stop) -> None:
    """Detached runs have no `clipfleet run` sweeping them: one worker of the fleet does."""
    import redis
    from clipfleet.shared.recovery import FleetSweeper, sweep_s
    sweeper = None
    while not stop.wait(sweep_s()):
        try:
            if sweeper is None:
                from clipfleet.workers.publish import publish_settled
                sweeper = FleetSweeper(app, redis.Redis.from_url(app.conf.broker_url, socket_timeout=10,
                                                                 socket_connect_timeout=5), holder,
                                       on_settled=publish_settled)
            sweeper.sweep_once()
        except Exception as exc:  # the broker away: try again next time
            log.warning("fleet sweep failed (%s: %s)", exc.__class__.__name__, exc)


@signals.worker_ready.connect
def _start_fleet_sweeper(sender=None, **kw):
    import threading
    global _fleet_sweeper_stop
    _fleet_sweeper_stop = threading.Event()
    holder = f"{getattr(sender, 'hostname', None) or 'worker'}:{os.getpid()}"
    threading.Thread(target=_fleet_sweeper_loop, args=(holder, _fleet_sweeper_stop), daemon=True,
                     name="clipfleet-fleet-sweeper").start()


@signals.worker_shutdown.connect
def _stop_heartbeat(sender=None, **kw):
    # No release on the way out: a cold shutdown requeues our unacked messages, and a lease
    # left behind lapses within CLIPFLEET_LEASE_S.
    if _heartbeat is not None:
        _heartbeat.stop()
    if _fleet_sweeper_stop is not None:
        _fleet_sweeper_stop.set()
