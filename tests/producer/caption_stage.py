"""A stage added the way a user adds one: a Stage, its options and its spec, registered in one
place (this module, named in $CLIPFLEET_PLUGINS). It reads each downloaded shard, counts the words
of every caption, keeps the samples whose caption has at least --min-caption-words words, and
writes caption-stats/{shard}.parquet. It has a queue of its own, so the fleet starts a worker for it."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.options import option
from clipfleet.shared.pipeline import Stage, StageOutput, Stats
from clipfleet.shared.stages import StageSpec
from clipfleet.shared.storage import Store, shard_name
from clipfleet.workers.registry import REGISTRY


@dataclass
class CaptionOptions:
    min_caption_words: int = option(2, "caption-stats (a test stage): drop captions with fewer words")


class CaptionStats(Stage):
    name = "caption-stats"

    def run(self, store: Store, shard: int, out: Path, stats: Stats, **inputs) -> StageOutput:
        images = pq.read_table(io.BytesIO(store.read_bytes(layout.image_shard(shard, "parquet"))))
        rows = [r for r in images.to_pylist() if r["status"] == "success"]
        words = [len((r.get("caption") or "").split()) for r in rows]
        kept = [n >= self.options.min_caption_words for n in words]
        path = out / "captions.parquet"
        pq.write_table(pa.table({"key": [r["key"] for r in rows], "words": words, "kept": kept}), path)
        stats.samples_in(len(rows))
        stats.kept(sum(kept))
        stats.drop("short caption", len(rows) - sum(kept))
        stats.add("words", sum(words))
        return StageOutput({f"caption-stats/{shard_name(shard)}.parquet": path})


SPEC = StageSpec(name="caption-stats", queue="cpu-captions", stage=f"{__name__}:CaptionStats",
                 options=CaptionOptions, title="caption stats (a test stage)", outputs="caption-stats/")
if SPEC.name not in REGISTRY:
    REGISTRY.add(SPEC, after="download")
