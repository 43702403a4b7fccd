"""The tagging task: an embedded shard in, its tags and its published dataset shard out (see stage.py)."""
from clipfleet.shared.pipeline import run_stage
from clipfleet.workers.app import ShardTask, app
from clipfleet.workers.tag.stage import TagStage


@app.task(name="clipfleet.tag", base=ShardTask)
def tag(store_uri: str, shard: int) -> dict:
    return run_stage(TagStage, store_uri, shard)
