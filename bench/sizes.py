"""Bench sizes: one knob for every bench, and one per bench and size.

`python -m bench --scale 0.05` (or CLIPFLEET_BENCH_SCALE) multiplies every bench's default
size, so the whole `make bench` can be checked end to end in a few minutes; --repeats (or
CLIPFLEET_BENCH_REPEATS) caps the best-of-N repeats. A size's own variable
(CLIPFLEET_BENCH_<NAME>, as `python -m bench --help` lists) wins over the scale. Results carry
the scale they ran at, so a quick run is never mistaken for a measurement.
"""
from __future__ import annotations

import os

# name -> (default, floor at small scales, what it is); the floors keep a quick run meaningful
# (enough samples that each contender does real work, a shard or two).
SIZES = {
    "EXTRACT_SAMPLES": (120_000, 2_000, "images in the extract bench's sandbox WATs"),
    "DOWNLOAD_SAMPLES": (3_000, 200, "images the download bench fetches (stage vs img2dataset vs floor)"),
    "PHASH_SAMPLES": (1_000, 200, "images decoded and hashed in the perceptual hash bench"),
    "POLITE_LARGE_SAMPLES": (20_000, 0, "images of the fast-host whole-process row at the larger size (0: off)"),
    "POLITE_SAMPLES": (3_000, 200, "images of the fast-host whole-process row"),
    "POLITE_CAPACITY_SAMPLES": (1_200, 120, "images from the capacity-limited host"),
    "POLITE_ROBOTS_PER_HOST": (30, 3, "images per host in the robots.txt row"),
    "CLIP_SAMPLES": (256, 128, "samples through the clip stage and clip-retrieval inference"),
    "TAG_SAMPLES": (10_000, 500, "samples in the tag bench's shard"),
    # 200 000 x 768, LAION's ViT-L/14 width: each autofaiss build takes ~2.7 minutes on 2 idle cores.
    "INDEX_VECTORS": (200_000, 5_000, "vectors (768-d) in the index bench"),
    "SEARCH_SAMPLES": (200_000, 20_000, "vectors in the search bench's index"),
    "SEARCH_REQUESTS": (3_000, 200, "requests per search bench run"),
    "SCALE_DEDUP_URLS": (10_000_000, 200_000, "URLs claimed in the dedup bytes-per-URL measurement"),
    "SCALE_SHARDS": (100_000, 1_000, "shards a stage in the largest run-state measurement (also 1/100, 1/10 of it)"),
}


def scale() -> float:
    return float(os.environ.get("CLIPFLEET_BENCH_SCALE") or 1.0)


def size(name: str) -> int:
    """The size `name` for this run: its own variable, else its default times the scale."""
    default, floor, _ = SIZES[name]
    own = os.environ.get(f"CLIPFLEET_BENCH_{name}")
    if own:
        return int(own)
    if scale() == 1.0 or default == 0:
        return default
    return 0 if floor == 0 and scale() < 1 else max(floor, int(default * scale()))


def repeats(default: int) -> int:
    """Best-of-N repeats, capped by CLIPFLEET_BENCH_REPEATS."""
    cap = os.environ.get("CLIPFLEET_BENCH_REPEATS")
    return max(1, min(default, int(cap))) if cap else default


def describe() -> str:
    return "\n".join(f"  CLIPFLEET_BENCH_{name:<24} {help_} (default {default:,})"
                     for name, (default, _, help_) in SIZES.items())
