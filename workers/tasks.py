"""The Celery glue around stages: one task per registered stage and run-once task, made from the
registry by `register_tasks`, and what every such task does (run the stage once, record it in the
run state, send the next stage, send the run-once tasks it made due).

Run-once tasks (training an index, a final merge) are keyed by a string, not a shard. Per-shard
stages name the ones they may make due in `triggers`; after each of their shards `run_stage` asks
each one `due(store)` and sends it when it answers a key that has no marker yet. `run_once` runs
it exactly once per key:
  - the marker under _markers/<name>/<key>.json is checked first and written last (execute),
    so a redelivered or duplicated task does nothing, and a killed one is redone whole;
  - a Redis lock, renewed by a heartbeat while the task runs, keeps two workers from running
    the same task at once; a task that finds it held comes back later (a killed holder's lock
    lapses within ONCE_LOCK_S);
  - `after(store_uri, key)` runs after the marker on every delivery, for follow-up work that is
    idempotent (the index's train task adds the shards that waited for it there), so a worker
    killed between the marker and the follow-up loses nothing;
  - a flag per key keeps every shard that finds the task due from sending it again; it lapses
    after ONCE_RESEND_S, so a task lost with its message is sent again by the next trigger.
"""
from __future__ import annotations

import functools
import logging
import threading

from clipfleet.shared.leases import progress_key, run_key
from clipfleet.shared.pipeline import RunOnce, Stage, TransientError, execute
from clipfleet.shared.runconfig import RunConfig, revision
from clipfleet.shared.runindex import RunIndex
from clipfleet.shared.stages import REGISTRY, StageSpec, load
from clipfleet.shared.storage import Store
from clipfleet.workers.app import ShardTask, app, broker_redis

log = logging.getLogger("clipfleet.tasks")

ONCE_LOCK_S = 30.0
ONCE_RESEND_S = 600.0
ONCE_BUSY_RETRY_S = 15.0


def register_tasks(spec: StageSpec) -> None:
    """The Celery task of `spec`'s stage and of its run-once tasks (a no-op when registered).
    The stage's module is imported here, at the worker's start: a broken stage fails it there."""
    if spec.task_name not in app.tasks:
        stage_cls = spec.stage_class()

        @app.task(name=spec.task_name, base=ShardTask)
        def shard_task(store_uri: str, shard: int, **inputs) -> dict:
            return run_stage(stage_cls, store_uri, shard, **inputs)
    for name, target in spec.run_once.items():
        if f"clipfleet.{name}" not in app.tasks:
            _register_once(name, target)


def _register_once(name: str, target: str) -> None:
    once_cls = load(target)

    @app.task(name=f"clipfleet.{name}", base=ShardTask)
    def once_task(store_uri: str, key: str) -> dict:
        return run_once(once_cls, store_uri, key)


@functools.lru_cache(maxsize=16)
def _stage_instance(stage_cls: type[Stage], store_uri: str, rev: float) -> Stage:
    # One instance per process and run revision, so models and clients load once, in the worker.
    stage = stage_cls(RunConfig.load(Store(store_uri)))
    stage.run_index = run_index(store_uri, stage.run_config.created_at)  # its run-once checks read it
    return stage


def run_index(store_uri: str, created_at: float) -> RunIndex:
    """The run state in the broker's Redis (shared/runindex.py)."""
    return RunIndex(broker_redis(), store_uri, created_at)


def _instance(stage_cls, store: Store) -> Stage:
    return _stage_instance(stage_cls, store.uri, revision(store.read_json("run.json")))


def run_stage(stage_cls: type[Stage], store_uri: str, shard: int, **inputs) -> dict:
    """What every stage task does: run the stage once, then enqueue the next stage."""
    store = Store(store_uri)
    stage = _instance(stage_cls, store)  # one small read per task: which run, which revision
    nxt = REGISTRY.next(stage.name)  # recorded whatever --until says: a later --until takes the run further
    marker = execute(stage, store, shard, on_progress=_progress_reporter(store_uri, stage.name, shard),
                     on_commit=lambda m: stage.run_index.record(stage.name, nxt, m), **inputs)
    enqueue_next(stage, store_uri, marker["next_shards"])
    trigger_due(store_uri, stage.triggers)
    return {"shard": shard, "stats": marker["stats"], "skipped": marker.get("skipped", False)}


def _progress_reporter(store_uri: str, stage: str, shard: int):
    """Samples handled so far in a running shard, into Redis for `run` and `status` to show."""
    key = progress_key(store_uri, stage, shard)
    return lambda n: broker_redis().set(key, n, ex=600)


def enqueue_next(stage: Stage, store_uri: str, shards: list[int]) -> None:
    nxt = REGISTRY.next(stage.name)
    if nxt is None or stage.run_config.until == stage.name:
        return
    try:
        for shard in shards:
            app.send_task(REGISTRY[nxt].task_name, args=(store_uri, shard))
    except Exception as exc:
        # The shard is done (its marker is written); a retry of this task skips the stage and
        # sends again. Were that lost too, the sweeper sends the next stage's shard itself.
        raise TransientError(f"could not enqueue {nxt} for {len(shards)} shards: {exc}") from exc


def _once_queue(name: str) -> str:
    return REGISTRY.run_once()[name][0].queue


def trigger_due(store_uri: str, names) -> list[tuple[str, str]]:
    """Send every run-once task named in `names` that is due and not done; returns (name, key)s."""
    if not names:
        return []
    store = Store(store_uri)
    sent = []
    for name in names:
        once = _instance(load(REGISTRY.run_once()[name][1]), store)
        key = once.due(store)
        if key is None or store.marker(name, key) is not None:
            continue
        flag = f"clipfleet:once:{run_key(store_uri)}:{name}:{key}"
        if broker_redis().set(flag, "1", nx=True, ex=int(ONCE_RESEND_S)):
            app.send_task(f"clipfleet.{name}", args=(store_uri, key), queue=_once_queue(name))
            log.info("%s %s: due, sent", name, key)
            sent.append((name, key))
    return sent


def run_once(once_cls: type[RunOnce], store_uri: str, key: str) -> dict:
    """What a run-once task does: run it once for `key` under the run's lock, its follow-up,
    then check the run-once tasks it may have made due."""
    store = Store(store_uri)
    once = _instance(once_cls, store)
    lock = broker_redis().lock(f"clipfleet:once-lock:{run_key(store_uri)}:{once.name}",
                               timeout=ONCE_LOCK_S, thread_local=False)
    if not lock.acquire(blocking=False):
        # Another worker runs this task (maybe for another key); this delivery comes back later.
        app.send_task(f"clipfleet.{once.name}", args=(store_uri, key), queue=_once_queue(once.name),
                      countdown=ONCE_BUSY_RETRY_S)
        return {"key": key, "busy": True}
    stop = _renew_in_background(lock)
    try:
        marker = execute(once, store, key, on_commit=lambda m: once.run_index.record(once.name, None, m))
        once.after(store_uri, key)
    finally:
        stop()
    trigger_due(store_uri, once.triggers)
    return {"key": key, "stats": marker["stats"], "skipped": marker.get("skipped", False)}


def _renew_in_background(lock):
    """Keep `lock` alive while the task runs; returns a function that stops and releases it."""
    stopped = threading.Event()

    def renew():
        while not stopped.wait(ONCE_LOCK_S / 3):
            try:
                lock.reacquire()
            except Exception as exc:  # Redis away for a moment: the next beat tries again
                log.warning("could not renew %s: %s", lock.name, exc)

    thread = threading.Thread(target=renew, daemon=True, name="once-lock")
    thread.start()

    def stop():
        stopped.set()
        thread.join(timeout=5)
        try:
            lock.release()
        except Exception:  # lapsed already; nobody else can have run meanwhile without it
            pass
    return stop
