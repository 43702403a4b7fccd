"""The cpu-extract task: a WAT segment in, URL shards out (see stage.py)."""
from clipfleet.shared.pipeline import run_stage
from clipfleet.workers.app import ShardTask, app
from clipfleet.workers.extract.stage import ExtractStage


@app.task(name="clipfleet.extract", base=ShardTask)
def extract(store_uri: str, shard: int, wat: str) -> dict:
    return run_stage(ExtractStage, store_uri, shard, wat=wat)
