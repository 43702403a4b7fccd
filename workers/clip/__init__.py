"""gpu-clip: CLIP image-text similarity of every downloaded sample, and which ones are kept."""
from clipfleet.shared.stages import StageSpec
from clipfleet.workers.clip.options import ClipOptions

SPEC = StageSpec(
    name="clip", queue="gpu-clip", stage="clipfleet.workers.clip.stage:ClipStage",
    options=ClipOptions, title="CLIP filter", outputs="clip/",
    single_process=True,  # a model / an index loaded once per worker
)
