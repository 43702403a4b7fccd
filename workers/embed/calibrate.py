"""How far the run's own model moves a copied picture, measured on a few of each shard's pictures.

SemDeDup's eps and the perceptual hash's Hamming threshold only mean something for one model and
one kind of picture: the sandbox's toy model puts distinct pictures of one shape closer together
than CLIP puts a picture and its JPEG re-encode. So each embed shard takes PICTURES of its kept
pictures (chosen by a hash of the key, so a rerun takes the same), makes the copies the web makes
(shared.images.web_copies: re-encoded, shrunk, cropped), embeds picture and copies with the run's
model and counts, in its stats, the cosine distance and the pHash bits between each copy and its
picture as histograms. Stats are summed per stage (shared/summaries.py), so index-dedup reads the
whole run's calibration from the embed stage's totals (workers/index/calibration.py) without
reading a marker per shard. Cost: PICTURES x 4 more images through the model per shard.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np

from clipfleet.shared.images import picture, web_copies
from clipfleet.shared.pipeline import Stats

PICTURES = 2
COPY_DISTANCE = "near_dup_copy_distance"  # stats group: upper bin edge -> copies whose cosine distance is in the bin
COPY_BITS = "near_dup_copy_bits"          # stats group: pHash bits -> copies that many bits from their picture
EDGES = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2,
         0.3, 0.5, 2.0)


def distance_label(d: float) -> str:
    """The histogram bin of a cosine distance: its upper edge, zero-padded so labels sort as numbers."""
    edge = next((e for e in EDGES if d <= e), EDGES[-1])
    return f"{edge:.4f}"


def chosen(keys) -> list[str]:
    """The shard's calibration pictures: a fixed choice, so a redelivered shard counts the same."""
    return sorted(keys, key=lambda k: hashlib.sha1(k.encode()).digest())[:PICTURES]


def measure(encoder, samples, resize_mode: str | None, stats: Stats) -> int:
    """Embed each sample's picture and its web copies; count distances into `stats`. Returns how
    many copies were measured (a picture that does not decode is left out: the filter judged it)."""
    import cv2
    import torch
    from PIL import Image

    from clipfleet.workers.download.phash import phash_bgr, phash_bytes, to_int
    from clipfleet.workers.image_batches import Undecodable, decode_pil

    measured = 0
    for sample in samples:
        try:
            image = picture(decode_pil(sample.data), sample.row, resize_mode).convert("RGB")
        except Undecodable:
            continue
        bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
        copies = web_copies(bgr)
        pictures = [image] + [Image.open(io.BytesIO(c)).convert("RGB") for c in copies.values()]
        emb = encoder.images(torch.stack([encoder.preprocess(p) for p in pictures])).cpu().numpy()
        own = to_int(phash_bgr(bgr))
        for row, data in zip(emb[1:], copies.values()):
            stats.add(distance_label(max(0.0, 1.0 - float(emb[0] @ row))), under=COPY_DISTANCE)
            stats.add(f"{bin(own ^ to_int(phash_bytes(data))).count('1'):02d}", under=COPY_BITS)
            measured += 1
    return measured
