"""The gpu-embed task: a filtered shard in, embeddings in clip-retrieval's layout out (see stage.py)."""
from clipfleet.shared.pipeline import run_stage
from clipfleet.workers.app import ShardTask, app
from clipfleet.workers.embed.stage import EmbedStage


@app.task(name="clipfleet.embed", base=ShardTask)
def embed(store_uri: str, shard: int) -> dict:
    return run_stage(EmbedStage, store_uri, shard)
