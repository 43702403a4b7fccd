"""Samples in and out of a stage, and why samples were dropped, read from its markers' stats.

A stage may count `samples_in` / `samples_out` itself (`stats.add("samples_out", n)`); for the
stages built before that convention, the keys they already count are mapped here.
"""
from __future__ import annotations

from collections import Counter

# stage -> (stat counting samples that came in, stat counting samples it kept / stored)
SAMPLE_KEYS = {
    "extract": ("img_links", "pairs"),     # <img> links seen in the WAT, pairs written to URL shards
    "download": ("count", "success"),      # URLs in the shard, images stored
    "clip": ("samples", "kept"),           # images judged, pairs over the threshold
    "embed": ("vectors", "vectors"),       # kept pairs in, embedded pairs out
    "tag": ("tagged", "published"),        # embedded pairs tagged, samples published in dataset/
    "index": ("vectors", "vectors"),       # vectors of the shard, vectors it added to the index
}
# Stats (and nested groups, e.g. `refused`) that say why samples were dropped.
DROP_PREFIXES = ("drop_", "dropped", "failed", "refused", "below_", "removed_", "filtered_", "rejected")


def sample_keys(stage: str, stats: dict) -> tuple[str | None, str | None]:
    if "samples_in" in stats or "samples_out" in stats:
        return "samples_in", "samples_out"
    return SAMPLE_KEYS.get(stage, (None, None))


def samples_in(stage: str, stats: dict) -> int | None:
    key = sample_keys(stage, stats)[0]
    value = stats.get(key) if key else None
    return int(value) if isinstance(value, (int, float)) else None


def samples_out(stage: str, stats: dict) -> int | None:
    key = sample_keys(stage, stats)[1]
    value = stats.get(key) if key else None
    return int(value) if isinstance(value, (int, float)) else None


def totals(markers: list[dict]) -> dict:
    """Every count of the markers summed; nested groups (e.g. `refused`) summed inside."""
    flat, nested = Counter(), {}
    for m in markers:
        for key, value in (m.get("stats") or {}).items():
            if isinstance(value, dict):
                group = nested.setdefault(key, Counter())
                group.update({k: v for k, v in value.items() if _is_count(v)})
            elif _is_count(value):
                flat[key] += value
    out = dict(sorted(flat.items()))
    for key, group in sorted(nested.items()):
        out[key] = dict(sorted(group.items()))
    return out


def _is_count(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def drop_reasons(total: dict, top: int = 5) -> list[tuple[str, int]]:
    """The largest reasons samples were dropped, as (name, count); nested ones as group: reason."""
    reasons = []
    for key, value in total.items():
        if isinstance(value, dict):
            if key.startswith(DROP_PREFIXES):
                # a group named "dropped" says nothing its reasons do not (clip: "below threshold")
                reasons += [(k if key == "dropped" else f"{key}: {k}", v) for k, v in value.items() if v]
        elif key.startswith(DROP_PREFIXES) and value:
            reasons.append((key, value))
    return sorted(reasons, key=lambda r: (-r[1], r[0]))[:top]


# Where each stage's outputs are, relative to the store (shared/layout.py's paths).
OUTPUTS = {"extract": "urls/", "download": "images/", "clip": "clip/", "embed": "embeddings/",
           "tag": "dataset/", "index": "index/"}
