"""The stage contract: the Stage base, typed stats, and the one place that runs a stage on a shard.

A stage is a small class with `run(store, shard, out, stats, **inputs)`: it reads its inputs from
the store (paths from `shared/layout.py`), writes its output files into the local directory
`out`, counts what happened (`stats.samples_in(n)`, `stats.kept(n)`, `stats.drop(reason, n)`), and
returns a `StageOutput`. `execute` owns everything around that: skipping shards already marked
done, timing, the atomic commit and the completion marker (its fields: layout.MARKER_FIELDS).
Which stages exist is the registry's business (shared/stages.py); sending tasks is the Celery
glue's (workers/tasks.py); which shards are expected and done is the run state's (shared/runstate.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store

log = logging.getLogger("clipfleet.pipeline")

class TransientError(Exception):
    """A failure worth retrying later (broker hiccup, storage timeout); anything else is final."""


class Stats:
    """What a stage counts for one shard; the marker, `status` and `report` read it.

    Typed counts, which every reader understands without knowing the stage:
      `samples_in(n)`   samples that came into the stage,
      `kept(n)`         samples it kept and handed on,
      `drop(reason, n, under=None)`  samples it dropped, and why (`under` groups reasons, e.g.
                        drop("private address", under="refused"); `status` shows groups nested).
    The stage's own vocabulary besides: `add(name, n, under=None)` counts something that is not
    a drop (img2dataset's "success", "reused_from_clip"), `put(name, value)` records a value
    (a duration, samples/s) that is not summed.

    `advance(n)` says n more input samples were handled; while the shard runs, `clipfleet run`
    and `status` show that (a shard of 10 000 samples is not stuck at 0 for minutes)."""

    REPORT_EVERY_S = 1.0

    def __init__(self, on_progress=None):
        self._data: dict = {}
        self._in: int | None = None
        self._out: int | None = None
        self._dropped: set[str] = set()
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

    def samples_in(self, n: int) -> None:
        self._in = (self._in or 0) + int(n)

    def kept(self, n: int) -> None:
        self._out = (self._out or 0) + int(n)

    def drop(self, reason: str, n: int = 1, under: str | None = None) -> None:
        self.add(reason, n, under)
        self._dropped.add(under or reason)

    def add(self, reason: str, n: int = 1, under: str | None = None) -> None:
        target = self._data.setdefault(under, {}) if under else self._data
        target[reason] = target.get(reason, 0) + n

    def put(self, name: str, value) -> None:
        self._data[name] = value

    def get(self, reason: str, default=0):
        return self._data.get(reason, default)

    def as_dict(self) -> dict:
        return {k: dict(sorted(v.items())) if isinstance(v, dict) else v for k, v in sorted(self._data.items())}

    def record(self) -> dict:
        """The marker's count fields (layout.MARKER_FIELDS)."""
        return {"stats": self.as_dict(), "samples_in": self._in, "samples_out": self._out,
                "dropped": sorted(self._dropped)}


@dataclass
class StageOutput:
    files: dict[str, Path] = field(default_factory=dict)  # store-relative name -> local file to publish
    next_shards: list[int] | None = None                 # shards for the next stage; None means "this shard"


class Stage:
    """One step of the pipeline. Subclasses set `name` (their registry entry's) and implement `run`.
    `triggers`: names of run-once tasks (the registry's) a finished shard may make due."""
    name: str = ""
    triggers: tuple = ()
    run_index = None  # the run state in Redis (shared/runindex.py), set by the Celery glue in a worker

    def __init__(self, run: RunConfig):
        self.run_config = run
        self.options = run.sections.get(self.name)

    def run(self, store: Store, shard: int, out: Path, stats: Stats, **inputs) -> StageOutput:
        raise NotImplementedError


class RunOnce(Stage):
    """A task that runs once per run and key when its precondition holds (workers/tasks.py says how
    it stays exactly-once and resumable).

    Subclasses set `name` (marker folder and task name), `stage` (the stage whose queue and
    options section it uses), optionally `triggers` (run-once tasks to check after it), and
    implement `due(store) -> key | None` and `run(store, key, out, stats)`."""
    stage: str = ""

    def __init__(self, run: RunConfig):
        self.run_config = run
        self.options = run.sections.get(self.stage)

    def due(self, store: Store) -> str | None:
        raise NotImplementedError

    def after(self, store_uri: str, key: str) -> None:
        """Idempotent follow-up, run after the marker on every delivery."""


def execute(stage: Stage, store: Store, shard, *, on_progress=None, on_commit=None, **inputs) -> dict:
    """Run `stage` on `shard` once: a shard already marked done is not run again.
    `on_commit(marker)` runs after the marker is written, and again for a shard found done (so
    what it records, e.g. the run state, catches up after a crash between the two)."""
    done = store.marker(stage.name, shard)
    if done is not None:
        log.info("%s %s: already done, skipping", stage.name, shard)
        if on_commit is not None:
            on_commit(done)
        return {**done, "skipped": True}
    started = time.time()
    stats = Stats(on_progress)
    with store.staging() as out:
        result = stage.run(store, shard, out, stats, **inputs)
        next_shards = [shard] if result.next_shards is None else list(result.next_shards)
        duration = time.time() - started
        marker = store.commit(stage.name, shard, result.files, {
            **stats.record(),
            "started_at": started,
            "duration_s": round(duration, 3),
            "next_shards": next_shards,
        })
    log.info("%s %s: done in %.1fs %s", stage.name, shard, marker["duration_s"], marker["stats"])
    if on_commit is not None:
        on_commit(marker)
    return marker
