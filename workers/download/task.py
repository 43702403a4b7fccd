"""The cpu-download task: a URL shard in, an image shard out (see stage.py)."""
from clipfleet.shared.pipeline import run_stage
from clipfleet.workers.app import ShardTask, app
from clipfleet.workers.download.stage import DownloadStage


@app.task(name="clipfleet.download", base=ShardTask)
def download(store_uri: str, shard: int) -> dict:
    return run_stage(DownloadStage, store_uri, shard)
