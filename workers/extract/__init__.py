"""cpu-extract: one WAT segment -> language-tagged, deduplicated URL shards.

Importing this package is cheap; the stage and its task load only in workers that serve it.
"""
from clipfleet.shared.stages import StageSpec
from clipfleet.workers.extract.options import ExtractOptions

SPEC = StageSpec(
    name="extract", queue="cpu-extract", stage="clipfleet.workers.extract.stage:ExtractStage",
    options=ExtractOptions, title="extract (with --wat/--crawl)", outputs="urls/",
    starts="wat",
)
