"""`clipfleet run`: register a run, enqueue its first stage with backpressure, follow it.

A run is resumable by construction: every shard whose marker exists is skipped when
enqueueing, and the stage itself skips a marked shard if a duplicate task arrives anyway.
While it follows, the sweeper (producer/recovery.py) sends again any shard nobody holds.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field

from clipfleet.producer import counts
from clipfleet.shared import layout, leases
from clipfleet.shared.pipeline import QUEUES, STAGES, task_name
from clipfleet.shared.runconfig import OPTION_SECTION, RUN_FILE, RunConfig
from clipfleet.shared.storage import DEADLETTER, Store, StoreError, shard_name, unreachable_errors

log = logging.getLogger("clipfleet.run")

# The producer stops enqueueing while the first queue holds this many tasks, so a crawl of
# 100k segments never sits in Redis at once.
HIGH_WATER = int(os.environ.get("CLIPFLEET_HIGH_WATER", 1000))


def broker_lost_s() -> float:
    """How long `run` waits for an unreachable broker before it gives up, naming what is left."""
    return float(os.environ.get("CLIPFLEET_BROKER_LOST_S", 600))


class RunError(RuntimeError):
    """The run cannot start: conflicting store, bad inputs."""


@dataclass
class FirstTask:
    stage: str
    shard: int
    kwargs: dict


def stages_run(store: Store) -> list[str]:
    """Stages that have done (or failed) any shard in this store."""
    return [s for s in STAGES if store.list(f"_markers/{s}") or store.list(f"{DEADLETTER}/{s}")]


def register(store: Store, cfg: RunConfig) -> list[str]:
    """Write run.json, or check that the store holds this same run and take it further.

    A store may be taken further: `until` may change, and so may the options of stages that
    have not run yet. Anything else is a conflict, named flag by flag. Returns what changed."""
    if not store.exists(RUN_FILE):
        cfg.save(store)
        return []
    existing = RunConfig.load(store)
    changed = existing.differences(cfg)
    if not changed:
        return []
    ran = stages_run(store)
    conflicts = [name for name in changed if not _may_change(name, ran)]
    if conflicts:
        names = ", ".join(_flag(n) for n in conflicts)
        raise RunError(f"{store.uri} holds a run with different {names} "
                       f"({'stages ' + ', '.join(ran) + ' ran' if ran else 'registered'} with the old values); "
                       "rerun with its arguments (see its run.json), change only --until or the options "
                       "of stages that have not run, or use a new --store")
    cfg.created_at = existing.created_at  # the run's identity (dedup claims) stays
    cfg.versions = existing.versions
    store.write_json(RUN_FILE, {**cfg.to_dict(), "updated_at": time.time()})
    log.info("taking %s further: %s changed", store.uri, ", ".join(_flag(n) for n in changed))
    return changed


def _may_change(name: str, ran: list[str]) -> bool:
    if name == "until":
        return True
    section = OPTION_SECTION.get(name.removeprefix("--").replace("-", "_")) if name.startswith("--") else None
    return section is not None and section != "input" and section not in ran


def _flag(name: str) -> str:
    return name if name.startswith("--") else f"--{name.replace('_', '-')}"


def first_tasks(store: Store, cfg: RunConfig) -> list[FirstTask]:
    """The tasks that start the run: one extract per WAT, or one download per URL shard."""
    if cfg.input_kind == "wat":
        return [FirstTask("extract", i, {"wat": uri}) for i, uri in enumerate(cfg.inputs)]
    from clipfleet.producer.urls import write_url_shards
    return [FirstTask("download", shard, {}) for shard in write_url_shards(store, cfg)]


def queue_length(redis_client, queue: str) -> int:
    # kombu's Redis transport keeps each queue as a list named after it.
    return int(redis_client.llen(queue))


def _until_broker_answers(what: str, call, stop: threading.Event | None = None):
    """Call `call` until the broker answers: a feeder outlives a Redis restart."""
    delay = 0.5
    while True:
        try:
            return call()
        except Exception as exc:
            if not _is_broker_error(exc):
                raise
            log.warning("broker unreachable while %s (%s); retrying in %.0fs", what, exc, delay)
            if stop is not None and stop.wait(delay):
                raise
            if stop is None:
                time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _is_broker_error(exc: Exception) -> bool:
    import kombu.exceptions
    import redis
    return isinstance(exc, (redis.RedisError, kombu.exceptions.OperationalError, ConnectionError, OSError))


def enqueue(app, redis_client, store: Store, tasks: list[FirstTask], issued: set | None = None,
            stop: threading.Event | None = None) -> int:
    """Send the tasks not yet done, pausing while their queue is over the high-water mark.

    `issued` collects (stage, shard) of every task sent or found done, for the sweeper."""
    sent = 0
    for stage in dict.fromkeys(t.stage for t in tasks):
        done = store.done(stage)
        for t in (t for t in tasks if t.stage == stage):
            if shard_name(t.shard) in done:
                if issued is not None:
                    issued.add((stage, t.shard))
                continue
            while _until_broker_answers("checking the queue", lambda: queue_length(redis_client, QUEUES[stage]),
                                        stop) >= HIGH_WATER:
                time.sleep(1.0)
            _until_broker_answers("enqueueing", lambda: app.send_task(
                task_name(stage), args=(store.uri, t.shard), kwargs=t.kwargs), stop)
            if issued is not None:
                issued.add((stage, t.shard))
            sent += 1
    return sent


def stages_of(cfg: RunConfig, built: set[str]) -> list[str]:
    """The stages this run passes through: from its first stage to `until`, among those built."""
    start = "extract" if cfg.input_kind == "wat" else "download"
    chain = list(STAGES[STAGES.index(start): STAGES.index(cfg.until) + 1])
    return [s for s in chain if s in built] if all(s in built for s in chain[:1]) else []


@dataclass
class StageProgress:
    stage: str
    expected: set[str]   # shards known so far; grows while the stage before is running
    done: set[str]
    failed: set[str]
    finished: bool
    samples_expected: int | None = None   # samples in the expected shards, when known
    samples_done: int = 0                 # samples that went into done shards
    samples_out: int | None = None        # samples the stage kept / stored
    in_flight: set[int] = field(default_factory=set)
    queued: set[int] = field(default_factory=set)
    recovered: int = 0


class ProgressCache:
    """What never changes once written (markers, URL shard sizes), kept between polls."""

    def __init__(self):
        self.markers: dict[tuple[str, str], dict] = {}
        self.rows: dict[str, int | None] = {}

    def marker(self, store: Store, stage: str, name: str) -> dict:
        if (stage, name) not in self.markers:
            self.markers[stage, name] = store.marker(stage, name) or {}
        return self.markers[stage, name]

    def url_rows(self, store: Store, name: str) -> int | None:
        if name not in self.rows:
            import pyarrow.parquet as pq
            try:
                with store.open(layout.url_shard(name)) as f:
                    self.rows[name] = pq.ParquetFile(f).metadata.num_rows
            except (FileNotFoundError, OSError, ValueError):
                return None
        return self.rows[name]


def progress(store: Store, stages: list[str], first: list[FirstTask],
             next_cache: "ProgressCache | dict | None" = None) -> list[StageProgress]:
    """Per stage: which shards are expected (from the previous stage's markers), done, failed,
    and how many samples that is."""
    cache = next_cache if isinstance(next_cache, ProgressCache) else ProgressCache()
    out = []
    expected = {shard_name(t.shard) for t in first}
    expected_samples: dict[str, int | None] = {}
    upstream_finished = True
    for stage in stages:
        done = store.done(stage) & expected
        failed = {shard_name(d["shard"]) for d in store.deadletters(stage)} - done
        upstream_finished = upstream_finished and expected <= (done | failed)
        sizes = {n: (cache.url_rows(store, n) if stage == "download" else expected_samples.get(n))
                 for n in expected}
        p = StageProgress(stage, expected, done, failed, upstream_finished,
                          samples_expected=None if None in sizes.values() or not sizes else sum(sizes.values()))
        outs, handed = [], {}
        for name in done:
            marker = cache.marker(store, stage, name)
            stats = marker.get("stats") or {}
            got = counts.samples_in(stage, stats)
            p.samples_done += got if got is not None else (sizes.get(name) or 0)
            outs.append(counts.samples_out(stage, stats))
            nxt = [shard_name(s) for s in marker.get("next_shards", [])]
            for n in nxt:  # a shard handed on as it is carries its kept samples to the next stage
                handed[n] = outs[-1] if nxt == [name] else None
        p.samples_out = None if None in outs else sum(outs)
        out.append(p)
        expected, expected_samples = set(handed), handed
    return out


LOG_PROGRESS_S = 30.0


def _bar_counts(p: StageProgress) -> tuple[int | None, int, str]:
    if p.samples_expected is not None:
        return p.samples_expected, p.samples_done, "sample"
    return len(p.expected), len(p.done), "shard"


def follow(store: Store, stages: list[str], first: list[FirstTask], fleet=None, poll_s: float = 1.0,
           show_progress: bool = True, sweeper=None, issued: set | None = None) -> list[StageProgress]:
    """Block until every expected shard of every stage is done or dead-lettered.

    One bar per stage, in samples once the sizes of its shards are known (in shards until
    then), with shards done, in flight, queued, failed and recovered beside it. On a terminal
    the bars redraw when a count changes; in a log (not a TTY) a bar is printed when it
    changes but at most every LOG_PROGRESS_S, so a long run does not write a line a second.

    With a `sweeper`, every CLIPFLEET_SWEEP_S the shards nobody holds are sent again; a
    broker unreachable for CLIPFLEET_BROKER_LOST_S ends the run with an error naming them."""
    from tqdm import tqdm
    from clipfleet.producer.recovery import sweep_s
    # smoothing=0: the rate is (n - initial) / elapsed, samples this command saw done per second.
    bars = {s: tqdm(desc=f"{s:>8}", unit="shard", position=i, leave=True, disable=not show_progress,
                    dynamic_ncols=True, smoothing=0)
            for i, s in enumerate(stages)}
    started: set[str] = set()
    every = 0.0 if sys.stderr.isatty() else LOG_PROGRESS_S
    shown: dict[str, tuple[tuple, float]] = {}  # stage -> (counts drawn, when)
    cache = ProgressCache()
    holdings: dict = {}
    next_sweep, broker_lost_since, first_sweep, store_lost_since = 0.0, None, True, None
    try:
        while True:
            try:
                state = progress(store, stages, first, cache)
                settled = all(p.finished for p in state) and _run_once_settled(store, stages)
                store_lost_since = None
            except unreachable_errors() as exc:  # the store away for a while: wait, as for the broker
                store_lost_since = store_lost_since or time.monotonic()
                log.warning("store unreachable, retrying: %s", exc)
                if time.monotonic() - store_lost_since > broker_lost_s():
                    raise RunError(f"store {store.uri} unreachable for {broker_lost_s():.0f}s: {exc}") from exc
                time.sleep(poll_s)
                continue
            if sweeper is not None and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + sweep_s()
                try:
                    holdings = sweeper.sweep(_pending(state, first, issued), _done(state), resume=first_sweep)
                    first_sweep, broker_lost_since = False, None
                except Exception as exc:
                    if not _is_broker_error(exc) and not isinstance(exc, unreachable_errors()):
                        raise
                    broker_lost_since = broker_lost_since or time.monotonic()
                    log.warning("sweep skipped, broker or store unreachable: %s", exc)
                    if time.monotonic() - broker_lost_since > broker_lost_s():
                        left = {p.stage: sorted(p.expected - p.done - p.failed) for p in state}
                        raise RunError(f"broker unreachable for {broker_lost_s():.0f}s; unfinished shards: "
                                       + "; ".join(f"{s}: {', '.join(v)}" for s, v in left.items() if v))
            for p in state:
                h = holdings.get(p.stage)
                running = 0
                if h is not None:
                    p.in_flight, p.queued = h.in_flight & {int(x) for x in p.expected - p.done}, h.queued
                    running = sum(v for k, v in h.progress.items() if k in p.in_flight)
                p.recovered = sweeper.recovered[p.stage] if sweeper is not None else 0
                bar = bars[p.stage]
                total, n, unit = _bar_counts(p)
                if unit == "sample":  # samples handled inside shards still running
                    n = min(n + running, total) if total is not None else n + running
                if bar.unit != unit or p.stage not in started:
                    bar.reset(total=total)  # what was done before this command is no part of its rate
                    bar.unit, bar.initial, bar.n = unit, n, n
                    started.add(p.stage)
                bar.total, bar.n = total, n
                postfix = {"shards": f"{len(p.done)}/{len(p.expected)}", "in flight": len(p.in_flight),
                           "queued": len(p.queued), "failed": len(p.failed)}
                if p.recovered:
                    postfix["recovered"] = p.recovered
                drawn_counts = (total, n, tuple(postfix.values()))
                drawn, when = shown.get(p.stage, (None, float("-inf")))
                if drawn_counts != drawn and (time.monotonic() - when >= every or p.finished):
                    bar.set_postfix(postfix, refresh=False)
                    bar.refresh()
                    shown[p.stage] = (drawn_counts, time.monotonic())
            if settled:
                return state
            if fleet is not None and fleet.dead():
                raise RunError(f"fleet process exited: {', '.join(fleet.dead())}")
            time.sleep(poll_s)
    finally:
        for bar in bars.values():
            bar.close()


def _run_once_settled(store: Store, stages: list[str]) -> bool:
    """Stages whose work ends in run-once tasks (the index's merge) are finished only when
    those have nothing left to do (shared/pipeline.run_once_settled, where the tree has it)."""
    try:
        from clipfleet.shared.pipeline import run_once_settled
    except ImportError:
        return True
    cfg = RunConfig.load(store) if store.exists(RUN_FILE) else None
    return all(run_once_settled(store, s, cfg) for s in stages)


def _pending(state: list[StageProgress], first: list[FirstTask], issued: set | None) -> dict[str, set[int]]:
    """Shards the sweeper looks after: expected, not done, not dead; for the first stage only
    those the feeder has sent (the rest are still waiting for room in the queue)."""
    out = {}
    for i, p in enumerate(state):
        shards = {int(n) for n in p.expected - p.done - p.failed}
        if i == 0 and issued is not None:
            shards = {s for s in shards if (p.stage, s) in issued}
        out[p.stage] = shards
    return out


def _done(state: list[StageProgress]) -> dict[str, set[int]]:
    return {p.stage: {int(n) for n in p.done} for p in state}


def replay_deadletters(store: Store, stages: list[str]) -> list[tuple[str, str]]:
    """Set aside the dead letters of `stages` so their shards run again; returns which.

    A record is kept beside, under _deadletter/<stage>/replayed/, not deleted."""
    replayed = []
    for stage in stages:
        for name in store.list(f"{DEADLETTER}/{stage}"):
            if not name.endswith(".json"):
                continue
            rel = f"{DEADLETTER}/{stage}/{name}"
            record = store.read_json(rel)
            store.write_json(f"{DEADLETTER}/{stage}/replayed/{name[:-5]}-{int(time.time())}.json", record)
            store.fs.rm(store.path(rel))
            replayed.append((stage, name[:-5]))
    return replayed


def check_store(uri: str) -> Store:
    try:
        store = Store(uri)
        store.check_writable()
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"store {uri} cannot be used: {exc}") from exc
    return store


def summary(state: list[StageProgress]) -> str:
    return "; ".join(f"{p.stage}: {len(p.done)} done, {len(p.failed)} failed" for p in state)


def produced(store: Store, state: list[StageProgress]) -> tuple[list[str], list[str]]:
    """What the run produced, stage by stage, and the problems that make it fail.

    A stage that took samples in and stored none is a problem: the reasons are printed."""
    lines, problems = [], []
    for p in state:
        markers = [store.marker(p.stage, n) or {} for n in sorted(p.done)]
        total = counts.totals(markers)
        outs = [counts.samples_out(p.stage, m.get("stats") or {}) for m in markers]
        ins = [counts.samples_in(p.stage, m.get("stats") or {}) for m in markers]
        n_in = None if None in ins else sum(ins)
        n_out = None if None in outs else sum(outs)
        samples = (f", {n_in} samples in, {n_out} out" if n_in is not None and n_out is not None
                   else f", {n_out} samples out" if n_out is not None else "")
        lines.append(f"{p.stage}: {len(p.done)} of {len(p.expected)} shards done, {len(p.failed)} failed"
                     + (f", {p.recovered} recovered" if p.recovered else "") + samples)
        reasons = counts.drop_reasons(total)
        if reasons:
            lines.append("  dropped: " + ", ".join(f"{name} {n}" for name, n in reasons))
        if p.done:
            lines.append(f"  outputs: {store.url(counts.OUTPUTS.get(p.stage, ''))}")
        for d in store.deadletters(p.stage):
            problems.append(f"dead letter {p.stage} {shard_name(d['shard'])}: {d.get('error')}")
        if p.done and n_out == 0:
            why = "; ".join(f"{name} {n}" for name, n in reasons) or "no reason was counted"
            if n_in == 0:
                problems.append(f"{p.stage} got no samples: its input is empty ({why})")
            else:
                problems.append(f"{p.stage} stored no samples from {n_in if n_in is not None else 'its'} "
                                f"input samples ({why})")
            break  # the stages after it had nothing to work on
    return lines, problems


def run_with_fleet(cfg: RunConfig, store: Store, stages: list[str], first: list[FirstTask],
                   broker: str, fleet=None, detach: bool = False, show_progress: bool = True) -> int:
    """Enqueue, follow with the sweeper, print what was produced; the exit code of `run`."""
    import redis
    from clipfleet.producer.recovery import Sweeper
    from clipfleet.workers.app import make_app
    app, client = make_app(broker), redis.Redis.from_url(broker, socket_timeout=10, socket_connect_timeout=5)
    if detach:
        sent = enqueue(app, client, store, first)
        from clipfleet.producer.recovery import register_detached
        register_detached(client, store.uri)  # every task is sent: from now on the workers sweep it
        print(f"enqueued {sent} {first[0].stage} tasks; follow with: clipfleet status --store {store.uri}")
        return 0
    kwargs = {(t.stage, t.shard): t.kwargs for t in first}
    sweeper = Sweeper(app, client, store, task_kwargs=lambda stage, shard: kwargs.get((stage, shard), {}))
    issued: set = set()
    sent: list[int] = []  # the feeder's count, so a resumed run can say it sent nothing new
    stop = threading.Event()
    feeder = threading.Thread(target=lambda: sent.append(enqueue(app, client, store, first, issued, stop)),
                              daemon=True, name="feeder")
    feeder.start()
    try:
        state = follow(store, stages, first, fleet=fleet, sweeper=sweeper, issued=issued,
                       show_progress=show_progress)
    finally:
        stop.set()
    feeder.join(timeout=10)
    for p in state:
        p.recovered = sweeper.recovered[p.stage]
    if sent:
        print(f"sent {sent[0]} of {len(first)} {first[0].stage} tasks ({len(first) - sent[0]} already done)")
    resumed = sum(sweeper.resumed.values())
    if resumed:
        print(f"resumed {resumed} shards that a stage before had handed on")
    lines, problems = produced(store, state)
    print(summary(state))
    for line in lines:
        print(line)
    for problem in problems:
        print(f"clipfleet: {problem}", file=sys.stderr)
    return 1 if problems else 0
