"""The stage framework: the stages and their queues, the Stage base, and the one place that runs
a stage on a shard.

A stage is a small class with `run(store, shard, out, stats, **inputs)`: it reads its inputs from
the store (paths from `shared/layout.py`), writes its output files into the local directory
`out`, counts what happened with `stats.add(reason, n)`, and returns a `StageOutput`. The
framework owns everything around that: skipping shards already marked done, timing, the atomic
commit, the completion marker, enqueueing the next stage, and stages that run once per run
(`RunOnce`, triggered when their precondition holds; how they stay exactly-once and resumable is
written down above `ShardState` below). `shard_state(store, stage)` says which shards a stage
expects and whether all of them are done, for run-once preconditions and the producer alike.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from clipfleet.shared.retries import retry_shard_names
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store

log = logging.getLogger("clipfleet.pipeline")

# Stage name -> queue, in pipeline order.
QUEUES = {
    "extract": "cpu-extract",
    "download": "cpu-download",
    "clip": "gpu-clip",
    "embed": "gpu-embed",
    "tag": "tagging",
    "index": "index-merge",
}
STAGES = tuple(QUEUES)

# The stages that are built, and the module that registers each one's task(s). Nothing here is
# imported until a worker serves the stage's queue, so a download worker never loads torch.
TASK_MODULES = {
    "extract": "clipfleet.workers.extract.task",
    "download": "clipfleet.workers.download.task",
    "clip": "clipfleet.workers.clip.task",
    "embed": "clipfleet.workers.embed.task",
    "tag": "clipfleet.workers.tag.task",
    "index": "clipfleet.workers.index.task",
}

# Stages whose work ends in run-once tasks (below), and the store-only check that says those are
# done: a run is finished when every shard is done *and* this holds (the index's merge is no shard).
RUN_ONCE_SETTLED = {"index": "clipfleet.workers.index.plan:settled"}


def built_stages() -> list[str]:
    return [s for s in STAGES if s in TASK_MODULES]


class TransientError(Exception):
    """A failure worth retrying later (broker hiccup, storage timeout); anything else is final."""


def task_name(stage: str) -> str:
    return f"clipfleet.{stage}"


def next_stage(stage: str) -> str | None:
    i = STAGES.index(stage)
    return STAGES[i + 1] if i + 1 < len(STAGES) else None


class Stats:
    """What a stage counts for one shard; the marker, `status` and `report` read it.

    `add("below_threshold")` counts a reason; `add("private address", under="refused")` counts
    it inside a group, which `status` shows nested. `put(name, value)` records a value
    (a duration, samples/s) that is not summed as a count.

    `advance(n)` says n more input samples were handled; while the shard runs, `clipfleet run`
    and `status` show that (a shard of 10 000 samples is not stuck at 0 for minutes)."""

    REPORT_EVERY_S = 1.0

    def __init__(self, on_progress=None):
        self._data: dict = {}
        self._on_progress = on_progress
        self._advanced = 0
        self._reported_at = 0.0

    def advance(self, n: int = 1) -> None:
        self._advanced += n
        if self._on_progress is not None and time.monotonic() - self._reported_at >= self.REPORT_EVERY_S:
            self._reported_at = time.monotonic()
            try:
                self._on_progress(self._advanced)
            except Exception as exc:  # progress is a display; the shard goes on without it
                log.debug("progress report failed: %s", exc)

    def add(self, reason: str, n: int = 1, under: str | None = None) -> None:
        target = self._data.setdefault(under, {}) if under else self._data
        target[reason] = target.get(reason, 0) + n

    def put(self, name: str, value) -> None:
        self._data[name] = value

    def update(self, counts: dict) -> None:
        """Add a dict of counts (nested dicts become groups)."""
        for key, value in counts.items():
            if isinstance(value, dict):
                for reason, n in value.items():
                    self.add(reason, n, under=key)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.add(key, value)
            else:
                self.put(key, value)

    def get(self, reason: str, default=0):
        return self._data.get(reason, default)

    def as_dict(self) -> dict:
        return {k: dict(sorted(v.items())) if isinstance(v, dict) else v for k, v in sorted(self._data.items())}


@dataclass
class StageOutput:
    files: dict[str, Path] = field(default_factory=dict)  # store-relative name -> local file to publish
    next_shards: list[int] | None = None                 # shards for the next stage; None means "this shard"


class Stage:
    """One step of the pipeline. Subclasses set `name` and implement `run`."""
    name: str = ""

    def __init__(self, run: RunConfig):
        self.run_config = run
        self.options = getattr(run, self.name, None)

    @property
    def queue(self) -> str:
        return QUEUES[self.name]

    def run(self, store: Store, shard: int, out: Path, stats: Stats, **inputs) -> StageOutput:
        raise NotImplementedError


def execute(stage: Stage, store: Store, shard: int, *, on_progress=None, **inputs) -> dict:
    """Run `stage` on `shard` once: a shard already marked done is not run again."""
    done = store.marker(stage.name, shard)
    if done is not None:
        log.info("%s %s: already done, skipping", stage.name, shard)
        return {**done, "skipped": True}
    started = time.time()
    stats = Stats(on_progress)
    with store.staging() as out:
        result = stage.run(store, shard, out, stats, **inputs)
        next_shards = [shard] if result.next_shards is None else list(result.next_shards)
        duration = time.time() - started
        marker = store.commit(stage.name, shard, result.files, {
            "stats": stats.as_dict(),
            "started_at": started,
            "duration_s": round(duration, 3),
            "next_shards": next_shards,
        })
    log.info("%s %s: done in %.1fs %s", stage.name, shard, marker["duration_s"], marker["stats"])
    return marker


# -- inside a worker ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _stage_instance(stage_cls: type[Stage], store_uri: str, revision: float) -> Stage:
    # One instance per process and run revision (a store reused for a new run has a new
    # created_at; a run taken further with a later --until has a new updated_at), so models
    # and clients load once, in the worker process.
    return stage_cls(RunConfig.load(Store(store_uri)))


def run_stage(stage_cls: type[Stage], store_uri: str, shard: int, **inputs) -> dict:
    """What every stage task does: run the stage once, then enqueue the next stage."""
    store = Store(store_uri)
    raw = store.read_json("run.json")  # one small read per task: which run, which revision
    stage = _stage_instance(stage_cls, store_uri, raw.get("updated_at", raw["created_at"]))
    marker = execute(stage, store, shard, on_progress=_progress_reporter(store_uri, stage.name, shard), **inputs)
    enqueue_next(stage, store_uri, marker["next_shards"])
    trigger_due(store_uri, getattr(stage, "triggers", ()))  # run-once tasks this shard may make due
    return {"shard": shard, "stats": marker["stats"], "skipped": marker.get("skipped", False)}


def _progress_reporter(store_uri: str, stage: str, shard: int):
    """Samples handled so far in a running shard, into Redis for `run` and `status` to show."""
    from clipfleet.shared.leases import progress_key
    from clipfleet.workers.app import broker_redis
    key = progress_key(store_uri, stage, shard)
    return lambda n: broker_redis().set(key, n, ex=600)


def enqueue_next(stage: Stage, store_uri: str, shards: list[int]) -> None:
    from clipfleet.workers.app import app
    nxt = next_stage(stage.name)
    if nxt is None or stage.run_config.until == stage.name:
        return
    if nxt not in TASK_MODULES:  # later stages are not built yet
        log.info("no %s stage in this fleet yet; %d shards stop after %s", nxt, len(shards), stage.name)
        return
    try:
        for shard in shards:
            app.send_task(task_name(nxt), args=(store_uri, shard))
    except Exception as exc:
        # The shard is done (its marker is written); a retry of this task skips the stage and
        # sends again. Were that lost too, the sweeper sends the next stage's shard itself.
        raise TransientError(f"could not enqueue {nxt} for {len(shards)} shards: {exc}") from exc


# -- expected shards, and tasks that run once per run ------------------------------------------
# A stage that needs every shard (training an index, a final merge) is a `RunOnce`: a task keyed
# by a string, not a shard. Per-shard stages name the run-once tasks they may make due in
# `triggers`; after each of their shards `run_stage` asks each one `due(store)` and sends it when
# it answers a key that has no marker yet. `run_once` runs it exactly once per key:
#   - the marker under _markers/<name>/<key>.json is checked first and written last (execute),
#     so a redelivered or duplicated task does nothing, and a killed one is redone whole;
#   - a Redis lock, renewed by a heartbeat while the task runs, keeps two workers from running
#     the same task at once; a task that finds it held comes back later (a killed holder's lock
#     lapses within ONCE_LOCK_S);
#   - `after(store_uri, key)` runs after the marker on every delivery, for follow-up work that is
#     idempotent (the index's train task adds the shards that waited for it there), so a worker
#     killed between the marker and the follow-up loses nothing;
#   - a flag per key keeps every shard that finds the task due from sending it again; it lapses
#     after ONCE_RESEND_S, so a task lost with its message is sent again by the next trigger.
# `shard_state(store, stage)` says which shards a stage expects (from run.json's inputs: one
# extract shard per WAT, or the URL shards under urls/; then the markers' next_shards), which are
# done or dead-lettered, and whether every stage before it has finished.
ONCE_LOCK_S = 30.0
ONCE_RESEND_S = 600.0
ONCE_BUSY_RETRY_S = 15.0


@dataclass
class ShardState:
    stage: str
    expected: set[str]          # shard names the stage expects so far
    done: set[str]
    failed: set[str]
    upstream_complete: bool     # every stage before this one has done or dead-lettered all its shards

    @property
    def complete(self) -> bool:
        """Every shard this stage will ever get is done or dead-lettered."""
        return self.upstream_complete and self.expected <= (self.done | self.failed)


def first_shards(store: Store, cfg: RunConfig) -> tuple[str, set[str]]:
    """The run's first stage and its shards: one extract shard per WAT, or the URL shards."""
    from clipfleet.shared.storage import shard_name
    if cfg.input_kind == "wat":
        return "extract", {shard_name(i) for i in range(len(cfg.inputs))}
    return "download", {n[:-len(".parquet")] for n in store.list("urls") if n.endswith(".parquet")}


# (store uri, run created_at) -> {(stage, shard): next_shards}. Without it every run-once `due`
# check re-read every marker of the run, so each index task cost O(shards) store reads.
_NEXT_SHARDS: dict = {}


def shard_state(store: Store, stage: str, cfg: RunConfig | None = None,
                next_cache: dict | None = None) -> ShardState:
    """Expected, done and failed shards of `stage`, walking the markers from the run's inputs.
    Markers never change once written, so `next_cache` may keep their next_shards between calls."""
    from clipfleet.shared.storage import shard_name
    cfg = cfg or RunConfig.load(store)
    first, expected = first_shards(store, cfg)
    chain = STAGES[STAGES.index(first):]
    if stage not in chain:
        return ShardState(stage, set(), set(), set(), True)
    if next_cache is None:  # markers never change once written: each is read once per process and run
        next_cache = _NEXT_SHARDS.setdefault((store.uri, cfg.created_at), {})
    cache = next_cache
    upstream = True
    for name in chain[:chain.index(stage) + 1]:
        done = store.done(name) & expected
        failed = {shard_name(d["shard"]) for d in store.deadletters(name)} - done
        if name == stage:
            return ShardState(stage, expected, done, failed, upstream)
        upstream = upstream and expected <= (done | failed)
        handed = retry_shard_names(store) if name == "extract" else set()  # retry-failed's shards
        for shard in done:
            if (name, shard) not in cache:
                cache[name, shard] = (store.marker(name, shard) or {}).get("next_shards", [shard])
            handed.update(shard_name(s) for s in cache[name, shard])
        expected = handed
    raise AssertionError("unreachable")


class RunOnce(Stage):
    """A task that runs once per run and key when its precondition holds (see above).

    Subclasses set `name` (marker folder and task name), `stage` (the stage whose queue and
    options section it uses), optionally `triggers` (run-once tasks to check after it), and
    implement `due(store) -> key | None` and `run(store, key, out, stats)`."""
    stage: str = ""
    triggers: tuple = ()

    def __init__(self, run: RunConfig):
        self.run_config = run
        self.options = getattr(run, self.stage, None)

    @property
    def queue(self) -> str:
        return QUEUES[self.stage]

    def due(self, store: Store) -> str | None:
        raise NotImplementedError

    def after(self, store_uri: str, key: str) -> None:
        """Idempotent follow-up, run after the marker on every delivery."""


def _run_revision(store: Store) -> float:
    raw = store.read_json("run.json")
    return raw.get("updated_at", raw["created_at"])


def trigger_due(store_uri: str, once_classes) -> list[tuple[str, str]]:
    """Send every run-once task of `once_classes` that is due and not done; returns (name, key)s."""
    if not once_classes:
        return []
    from clipfleet.shared.leases import run_key
    from clipfleet.workers.app import app, broker_redis
    store = Store(store_uri)
    revision = _run_revision(store)
    sent = []
    for cls in once_classes:
        once = _stage_instance(cls, store_uri, revision)
        key = once.due(store)
        if key is None or store.marker(cls.name, key) is not None:
            continue
        flag = f"clipfleet:once:{run_key(store_uri)}:{cls.name}:{key}"
        if broker_redis().set(flag, "1", nx=True, ex=int(ONCE_RESEND_S)):
            app.send_task(task_name(cls.name), args=(store_uri, key), queue=once.queue)
            log.info("%s %s: due, sent", cls.name, key)
            sent.append((cls.name, key))
    return sent


def run_once_settled(store: Store, stage: str, cfg: RunConfig | None = None) -> bool:
    """Whether the run-once tasks of `stage` have nothing left to do (True for other stages).
    The check reads the store only, so the producer can call it without loading the stage."""
    import importlib
    target = RUN_ONCE_SETTLED.get(stage)
    if target is None:
        return True
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(store, cfg)


def run_once(once_cls: type[RunOnce], store_uri: str, key: str) -> dict:
    """What a run-once task does: run it once for `key` under the run's lock, its follow-up,
    then check the run-once tasks it may have made due."""
    from clipfleet.shared.leases import run_key
    from clipfleet.workers.app import app, broker_redis
    store = Store(store_uri)
    once = _stage_instance(once_cls, store_uri, _run_revision(store))
    lock = broker_redis().lock(f"clipfleet:once-lock:{run_key(store_uri)}:{once.name}",
                               timeout=ONCE_LOCK_S, thread_local=False)
    if not lock.acquire(blocking=False):
        # Another worker runs this task (maybe for another key); this delivery comes back later.
        app.send_task(task_name(once.name), args=(store_uri, key), queue=once.queue,
                      countdown=ONCE_BUSY_RETRY_S)
        return {"key": key, "busy": True}
    stop = _renew_in_background(lock)
    try:
        marker = execute(once, store, key)
        once.after(store_uri, key)
    finally:
        stop()
    trigger_due(store_uri, once.triggers)
    return {"key": key, "stats": marker["stats"], "skipped": marker.get("skipped", False)}


def _renew_in_background(lock):
    """Keep `lock` alive while the task runs; returns a function that stops and releases it."""
    import threading
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
