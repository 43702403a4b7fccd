"""Near-duplicate thresholds for this run's model and pictures, unless the run sets them.

Copies: the embed stage embedded, with the run's model, web copies (re-encoded, shrunk, cropped) of
a few of each shard's own pictures and summed how far each moved, as histograms in its stats
(workers/embed/calibrate.py). A threshold is the smallest that catches COVER of those copies.

Distinct pictures: pairs drawn at random inside the same coarse cluster (where SemDeDup compares),
leaving out pairs the perceptual hash already calls copies. If the copies' eps is not SEPARATION
times below the distance that DISTINCT_QUANTILE of those pairs fall within, the model does not
tell a copy from another picture of the same kind (the sandbox's toy model puts distinct pictures
of one shape nearly on top of each other) and semantic near-duplicates are off: pHash only.

Each relation then has to survive the other: a pHash pair whose embeddings are further apart than
VETO_COVER of the measured copies is not a copy (distinct pictures a few bits apart happen: a plain
background under a small shape), nor is a semantic pair whose hashes are further apart than that
share of the copies' (the model's "the same" is looser than a copy's: two blue stars on dots). Without copies
measured there is nothing to judge by, and no veto.

The Hamming threshold is the copies' but never above DEDUP_HAMMING (where the sandbox's closest
distinct pictures start to meet) nor under MIN_HAMMING. With no copies measured (embeddings from
an older run) the defaults stand, still checked against the distinct pairs. The result is a pure
function of the run's stats and vectors, so a redelivered task chooses the same.
"""
from __future__ import annotations

import numpy as np

from clipfleet.workers.embed.calibrate import COPY_BITS, COPY_DISTANCE
from clipfleet.workers.index.neardup import popcount, rows_f32
from clipfleet.workers.index.options import DEDUP_EPS, DEDUP_HAMMING

COVER = 0.95
DISTINCT_QUANTILE = 0.01
SEPARATION = 3.0
MIN_HAMMING = 4
VETO_COVER = 0.99
MAX_EPS = 0.1
PAIRS = 200_000


def covering(histogram: dict, cover: float = COVER) -> float | None:
    """The smallest bin value holding `cover` of the counts (None: nothing measured)."""
    items = sorted((float(k), int(v)) for k, v in (histogram or {}).items())
    total = sum(v for _, v in items)
    if total == 0:
        return None
    seen = 0
    for value, n in items:
        seen += n
        if seen >= cover * total:
            return value
    return items[-1][0]


def distinct_pairs(x: np.ndarray, assigned: np.ndarray, hashes: np.ndarray, has: np.ndarray, hamming: int,
                   seed: int) -> np.ndarray:
    """Cosine distances of up to PAIRS random pairs in one cluster, pHash copies left out."""
    order = np.argsort(assigned, kind="stable")
    starts = np.searchsorted(assigned[order], assigned)
    sizes = np.bincount(assigned)[assigned] if len(assigned) else np.zeros(0, np.int64)
    candidates = np.nonzero(sizes > 1)[0]
    if len(candidates) == 0:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    i = candidates[rng.integers(len(candidates), size=PAIRS)]
    j = order[starts[i] + rng.integers(sizes[i])]
    keep = i != j
    keep &= ~(has[i] & has[j] & (popcount(hashes[i] ^ hashes[j]) <= hamming))
    i, j = i[keep], j[keep]
    return _cosine_distances(x, i, j)


def _cosine_distances(x: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """1 - x_i . x_j for each pair, a block of rows read at a time (`x` may be a memory map)."""
    return np.concatenate([np.zeros(0)] + [
        1.0 - np.einsum("ij,ij->i", rows_f32(x, i[s:s + 8192]), rows_f32(x, j[s:s + 8192]))
        for s in range(0, len(i), 8192)])


def calibrate(options, embed_totals: dict, x: np.ndarray, assigned: np.ndarray, hashes: np.ndarray,
              has: np.ndarray) -> dict:
    """{"hamming", "eps", and how each was chosen}: what index-dedup uses and run.json records."""
    copy_bits = covering(embed_totals.get(COPY_BITS))
    copy_eps = covering(embed_totals.get(COPY_DISTANCE))
    copies = int(sum((embed_totals.get(COPY_DISTANCE) or {}).values()))
    out: dict = {"copies_measured": copies, "copy_bits_q95": None if copy_bits is None else int(copy_bits),
                 "copy_distance_q95": copy_eps}
    if copies:
        out.update(veto_bits=int(covering(embed_totals[COPY_BITS], VETO_COVER)),
                   veto_distance=covering(embed_totals[COPY_DISTANCE], VETO_COVER))

    if options.near_dup_hamming is not None:
        out.update(hamming=options.near_dup_hamming, hamming_from="--near-dup-hamming")
    elif copy_bits is None:
        out.update(hamming=DEDUP_HAMMING, hamming_from="default (no copies measured)")
    else:
        out.update(hamming=int(min(DEDUP_HAMMING, max(MIN_HAMMING, copy_bits))),
                   hamming_from=f"{COVER:.0%} of copies, within [{MIN_HAMMING}, {DEDUP_HAMMING}]")

    distances = distinct_pairs(x, assigned, hashes, has, out["hamming"], options.index_seed)
    distinct = float(np.quantile(distances, DISTINCT_QUANTILE)) if len(distances) else None
    out.update(distinct_pairs=int(len(distances)), distinct_distance_q01=None if distinct is None else round(distinct, 6))
    if options.near_dup_eps is not None:
        out.update(eps=options.near_dup_eps, eps_from="--near-dup-eps")
        return out
    wanted = min(MAX_EPS, copy_eps) if copy_eps is not None else DEDUP_EPS
    source = f"{COVER:.0%} of copies" if copy_eps is not None else "default (no copies measured)"
    if distinct is not None and wanted * SEPARATION > distinct:
        out.update(eps=0.0, eps_from=(f"off: {source} need eps {wanted:g}, but {DISTINCT_QUANTILE:.0%} of distinct "
                                      f"pairs are within {distinct:.4g}; this model does not tell copies from "
                                      f"other pictures (perceptual hashes only)"))
    else:
        out.update(eps=wanted, eps_from=source)
    return out


def confirmed(by_phash: np.ndarray, by_embedding: np.ndarray, x: np.ndarray, hashes: np.ndarray, has: np.ndarray,
              thresholds: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """The pairs of each relation the other does not rule out (module doc), and how many each lost."""
    if "veto_bits" not in thresholds:
        return by_phash, by_embedding, {}
    i, j = by_phash[:, 0], by_phash[:, 1]
    keep_phash = _cosine_distances(x, i, j) <= thresholds["veto_distance"]
    i, j = by_embedding[:, 0], by_embedding[:, 1]
    keep_embedding = ~(has[i] & has[j]) | (popcount(hashes[i] ^ hashes[j]) <= thresholds["veto_bits"])
    return (by_phash[keep_phash], by_embedding[keep_embedding],
            {"phash_pairs_vetoed": int((~keep_phash).sum()), "embedding_pairs_vetoed": int((~keep_embedding).sum())})
