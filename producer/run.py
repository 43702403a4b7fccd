"""`clipfleet run`: register a run, enqueue its first stage with backpressure, follow it.

A run is resumable by construction: every shard whose marker exists is skipped when
enqueueing, and the stage itself skips a marked shard if a duplicate task arrives anyway.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

from clipfleet.shared.pipeline import QUEUES, STAGES, task_name
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store, StoreError, shard_name

log = logging.getLogger("clipfleet.run")

# The producer stops enqueueing while the first queue holds this many tasks, so a crawl of
# 100k segments never sits in Redis at once.
HIGH_WATER = int(os.environ.get("CLIPFLEET_HIGH_WATER", 1000))


class RunError(RuntimeError):
    """The run cannot start: conflicting store, bad inputs."""


@dataclass
class FirstTask:
    stage: str
    shard: int
    kwargs: dict


def register(store: Store, cfg: RunConfig) -> None:
    """Write run.json, or check that the store already holds this same run."""
    if store.exists("run.json"):
        existing = RunConfig.load(store)
        if not existing.same_work(cfg):
            raise RunError(f"{store.uri} already holds a different run (see its run.json); "
                           "resume it with the same arguments or use a new --store")
        return
    cfg.save(store)


def first_tasks(store: Store, cfg: RunConfig) -> list[FirstTask]:
    """The tasks that start the run: one extract per WAT, or one download per URL shard."""
    if cfg.input_kind == "wat":
        return [FirstTask("extract", i, {"wat": uri}) for i, uri in enumerate(cfg.inputs)]
    from clipfleet.producer.urls import write_url_shards
    return [FirstTask("download", shard, {}) for shard in write_url_shards(store, cfg)]


def queue_length(redis_client, queue: str) -> int:
    # kombu's Redis transport keeps each queue as a list named after it.
    return int(redis_client.llen(queue))


def enqueue(app, redis_client, store: Store, tasks: list[FirstTask]) -> int:
    """Send the tasks not yet done, pausing while their queue is over the high-water mark."""
    sent = 0
    for stage in {t.stage for t in tasks}:
        done = store.done(stage)
        for t in (t for t in tasks if t.stage == stage):
            if shard_name(t.shard) in done:
                continue
            while queue_length(redis_client, QUEUES[stage]) >= HIGH_WATER:
                time.sleep(1.0)
            app.send_task(task_name(stage), args=(store.uri, t.shard), kwargs=t.kwargs)
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


def progress(store: Store, stages: list[str], first: list[FirstTask],
             next_cache: dict | None = None) -> list[StageProgress]:
    """Per stage: which shards are expected (from the previous stage's markers), done, failed.

    A marker never changes once written, so `next_cache` keeps what each one said between
    polls instead of reading every marker every second.
    """
    next_cache = {} if next_cache is None else next_cache
    out = []
    expected = {shard_name(t.shard) for t in first}
    upstream_finished = True
    for stage in stages:
        done = store.done(stage) & expected
        failed = {shard_name(d["shard"]) for d in store.deadletters(stage)} - done
        upstream_finished = upstream_finished and expected <= (done | failed)
        out.append(StageProgress(stage, expected, done, failed, upstream_finished))
        for name in done:
            if (stage, name) not in next_cache:
                next_cache[stage, name] = store.marker(stage, name).get("next_shards", [])
        expected = {shard_name(s) for name in done for s in next_cache[stage, name]}
    return out


LOG_PROGRESS_S = 30.0


def follow(store: Store, stages: list[str], first: list[FirstTask], fleet=None, poll_s: float = 1.0,
           show_progress: bool = True) -> list[StageProgress]:
    """Block until every expected shard of every stage is done or dead-lettered.

    On a terminal the bars redraw when a count changes; in a log (not a TTY) a bar is
    printed when it changes but at most every LOG_PROGRESS_S, so a long run does not
    write a line a second."""
    from tqdm import tqdm
    bars = {s: tqdm(desc=f"{s:>8}", unit="shard", position=i, leave=True, disable=not show_progress)
            for i, s in enumerate(stages)}
    every = 0.0 if sys.stderr.isatty() else LOG_PROGRESS_S
    shown: dict[str, tuple[tuple, float]] = {}  # stage -> (counts drawn, when)
    next_cache: dict = {}
    try:
        while True:
            state = progress(store, stages, first, next_cache)
            for p in state:
                bar = bars[p.stage]
                bar.total = len(p.expected)
                bar.n = len(p.done)
                counts = (bar.total, bar.n, len(p.failed))
                drawn, when = shown.get(p.stage, (None, float("-inf")))
                if counts != drawn and (time.monotonic() - when >= every or p.finished):
                    bar.set_postfix(failed=len(p.failed), refresh=False)
                    bar.refresh()
                    shown[p.stage] = (counts, time.monotonic())
            if all(p.finished for p in state):
                return state
            if fleet is not None and fleet.dead():
                raise RunError(f"fleet process exited: {', '.join(fleet.dead())}")
            time.sleep(poll_s)
    finally:
        for bar in bars.values():
            bar.close()


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
