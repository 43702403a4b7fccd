"""The pipeline's stages, in order: one line per stage. Adding a stage is its package (with its
`SPEC`) and one line here; a plugin module named in $CLIPFLEET_PLUGINS (comma list) adds its own
stage with `REGISTRY.add(SPEC, after=...)` when this module is imported."""
import importlib
import os

from clipfleet.shared.stages import REGISTRY
from clipfleet.workers import clip, download, embed, extract, index, tag

for _package in (extract, download, clip, embed, tag, index):
    if _package.SPEC.name not in REGISTRY:
        REGISTRY.add(_package.SPEC)

for _plugin in filter(None, (p.strip() for p in os.environ.get("CLIPFLEET_PLUGINS", "").split(","))):
    importlib.import_module(_plugin)

__all__ = ["REGISTRY"]
