"""The run's serving index as the search service opens it: the index stage's ServingIndex
(memory-mapped, read-only, taken-down ids never returned, new merges and takedowns picked up
while serving). This module only turns "not built" into the service's own error."""
from __future__ import annotations

from clipfleet.shared.storage import Store


class IndexMissing(LookupError):
    """The run has no index for the asked modality."""


def open_index(store: Store, modality: str):
    """The serving index of `modality` ("image" or "text"); IndexMissing when the run has none."""
    from clipfleet.shared.serving import IndexNotBuilt, ServingIndex
    try:
        return ServingIndex.open(store, modality=modality)
    except IndexNotBuilt as exc:
        raise IndexMissing(str(exc)) from None


def infos_model(index) -> str | None:
    return (getattr(index, "infos", None) or {}).get("model")
