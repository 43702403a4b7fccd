"""The stages, their queues, and the one place that runs a stage on a shard.

A stage is a small class with a `run(store, shard, out, **inputs)` method: it reads its
inputs from the store, writes its output files into the local directory `out`, and returns
a `StageOutput`. `execute` owns everything around that: skipping shards already marked
done, timing, atomic commit, the completion marker, and which shards go next.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.runconfig import RunConfig
from shared.storage import Store

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


class TransientError(Exception):
    """A failure worth retrying later (broker hiccup, storage timeout); anything else is final."""


def task_name(stage: str) -> str:
    return f"clipfleet.{stage}"


def next_stage(stage: str) -> str | None:
    i = STAGES.index(stage)
    return STAGES[i + 1] if i + 1 < len(STAGES) else None


@dataclass
class StageOutput:
    files: dict[str, Path]                  # store-relative name -> local file to publish
    stats: dict = field(default_factory=dict)  # counts that go into the marker
    next_shards: list[int] | None = None    # shards for the next stage; None means "this shard"


class Stage:
    name: str = ""

    def __init__(self, run: RunConfig):
        self.run_config = run

    def run(self, store: Store, shard: int, out: Path, **inputs) -> StageOutput:
        raise NotImplementedError


def execute(stage: Stage, store: Store, shard: int, **inputs) -> dict:
    """Run `stage` on `shard` once: a shard already marked done is not run again."""
    done = store.marker(stage.name, shard)
    if done is not None:
        log.info("%s %s: already done, skipping", stage.name, shard)
        return {**done, "skipped": True}
    started = time.time()
    with store.staging() as out:
        result = stage.run(store, shard, out, **inputs)
        next_shards = [shard] if result.next_shards is None else list(result.next_shards)
        marker = store.commit(stage.name, shard, result.files, {
            "stats": result.stats,
            "duration_s": round(time.time() - started, 3),
            "next_shards": next_shards,
        })
    log.info("%s %s: done in %.1fs %s", stage.name, shard, marker["duration_s"], result.stats)
    return marker
