"""gpu-embed: image and text embeddings of the kept samples, in clip-retrieval's layout."""
from clipfleet.shared.stages import StageSpec
from clipfleet.workers.embed.options import EmbedOptions

SPEC = StageSpec(
    name="embed", queue="gpu-embed", stage="clipfleet.workers.embed.stage:EmbedStage",
    options=EmbedOptions, title="embeddings", outputs="embeddings/",
    single_process=True,  # a model / an index loaded once per worker
)
