"""The index-merge tasks: a shard into the index, the one training, a merge (see stage.py)."""
from clipfleet.shared.pipeline import run_once, run_stage
from clipfleet.workers.app import ShardTask, app
from clipfleet.workers.index.stage import IndexStage, MergeIndex, TrainIndex


@app.task(name="clipfleet.index", base=ShardTask)
def index(store_uri: str, shard: int) -> dict:
    return run_stage(IndexStage, store_uri, shard)


@app.task(name="clipfleet.index-train", base=ShardTask)
def index_train(store_uri: str, key: str) -> dict:
    return run_once(TrainIndex, store_uri, key)


@app.task(name="clipfleet.index-merge", base=ShardTask)
def index_merge(store_uri: str, key: str) -> dict:
    return run_once(MergeIndex, store_uri, key)
