"""The gpu-clip task: an image shard in, its similarities and kept flags out (see stage.py)."""
from clipfleet.shared.pipeline import run_stage
from clipfleet.workers.app import ShardTask, app
from clipfleet.workers.clip.stage import ClipStage


@app.task(name="clipfleet.clip", base=ShardTask)
def clip(store_uri: str, shard: int) -> dict:
    return run_stage(ClipStage, store_uri, shard)
