"""index-merge: train one KNN index per run, add shards as they arrive, merge for serving."""
from clipfleet.shared.stages import StageSpec
from clipfleet.workers.index.options import IndexOptions

SPEC = StageSpec(
    name="index", queue="index-merge", stage="clipfleet.workers.index.stage:IndexStage",
    options=IndexOptions, title="index", outputs="index/",
    single_process=True,  # a model / an index loaded once per worker
    run_once={"index-train": "clipfleet.workers.index.stage:TrainIndex",
              "index-merge": "clipfleet.workers.index.stage:MergeIndex",
              "index-dedup": "clipfleet.workers.index.dedup:DedupIndex"},
    settled="clipfleet.workers.index.plan:settled",
)
