"""tagging: punsafe, pwatermark, aesthetic and user heads per embedded shard; then publish it."""
from clipfleet.shared.stages import StageSpec
from clipfleet.workers.tag.options import TagOptions

SPEC = StageSpec(
    name="tag", queue="tagging", stage="clipfleet.workers.tag.stage:TagStage",
    options=TagOptions, title="tagging", outputs="dataset/",
)
