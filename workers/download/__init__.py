"""cpu-download: one URL shard -> resized webdataset shard in img2dataset's layout.

fetch (guarded, bounded, polite HTTP through http1), guard (address checks), politeness (per-host
limits through Redis), blocklist, resize, writer (the tar), stage (the loop that ties them).
Importing this package is cheap; the stage loads only in workers that serve it. Its public API
for others (search fetches and checks a query's image_url the way the stage would) is below,
imported on first use.
"""
import importlib

from clipfleet.shared.stages import StageSpec
from clipfleet.workers.download.options import DownloadOptions

SPEC = StageSpec(
    name="download", queue="cpu-download", stage="clipfleet.workers.download.stage:DownloadStage",
    options=DownloadOptions, title="download (img2dataset's option names)", outputs="images/",
    starts="urls",
)

_PUBLIC = {"Fetcher": "fetch", "FetchFailed": "fetch", "ImageRejected": "resize", "check_size": "resize",
           "sniff": "resize"}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(name)

