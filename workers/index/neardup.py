"""Near-duplicate groups across a whole run, from two relations, unioned:

- perceptual-hash neighbours: two pictures whose 64-bit pHashes differ in at most `hamming` bits.
  Pigeonhole: split the 64 bits into `hamming + 1` bands; two hashes that close agree exactly on one
  band at least, so only pictures sharing a band's value are compared (multi-index hashing).
- semantic near-duplicates (SemDeDup): image embeddings are clustered (by the index's trained
  coarse quantizer when the index is IVF, by k-means on the run's vectors otherwise), then inside a
  cluster two samples whose cosine similarity is >= 1 - eps are duplicates.

Pairs are joined by union-find; in each group the sample kept is the one with the highest CLIP
similarity, ties by key, and every other one names it. Pure functions of their inputs, so a rerun
computes the same groups.
"""
from __future__ import annotations

import numpy as np

from clipfleet.workers.download.phash import _POPCOUNT

BLOCK_ELEMENTS = 1 << 22  # comparisons made at once: a block of rows x a cluster, ~16 MiB of float32
ASSIGN_ELEMENTS = 1 << 22  # vector elements assigned to clusters at once
KMEANS_POINTS = 20_000  # without an IVF quantizer, one cluster per this many vectors (SemDeDup's scale)


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Union-find over `pairs`, vectorised: each row's label becomes the smallest row it is joined
    to (min-label propagation with pointer jumping; a Python loop per pair is too slow at scale)."""
    labels = np.arange(n, dtype=np.int64)
    if len(pairs) == 0:
        return labels
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        low = np.minimum(labels[a], labels[b])
        before = labels.copy()
        np.minimum.at(labels, a, low)
        np.minimum.at(labels, b, low)
        np.minimum.at(labels, before, labels)  # a root takes its members' smaller label too
        while True:  # pointer jumping: every row straight to its root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels, before):
            return labels


def popcount(x: np.ndarray) -> np.ndarray:
    """Bits set in each uint64 of `x` (any shape)."""
    return _POPCOUNT[np.ascontiguousarray(x, np.uint64).view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1)


def _unique(found: list[np.ndarray]) -> np.ndarray:
    """Each pair once (bands and blocks can find one twice); one int64 per pair sorts far faster than rows."""
    pairs = np.concatenate(found).astype(np.int64)
    packed = np.unique((pairs[:, 0] << np.int64(32)) | pairs[:, 1])
    return np.stack([packed >> np.int64(32), packed & np.int64(0xFFFFFFFF)], axis=1)


def _pairs_within(members: np.ndarray, close) -> list[np.ndarray]:
    """(i, j) pairs, i < j, of `members` for which close(rows, members) is true, a block at a time."""
    out, block = [], max(1, BLOCK_ELEMENTS // max(1, len(members)))
    for start in range(0, len(members) - 1, block):
        rows = members[start:start + block]
        hit = close(rows, members)
        i, j = np.nonzero(hit)
        keep = start + i < j  # each pair once, never a sample with itself
        out.append(np.stack([rows[i[keep]], members[j[keep]]], axis=1))
    return out


def phash_pairs(hashes: np.ndarray, valid: np.ndarray, hamming: int) -> np.ndarray:
    """(n, 2) index pairs of valid hashes within `hamming` bits of each other."""
    hashes = np.asarray(hashes, np.uint64)
    idx = np.nonzero(valid)[0]
    bands = min(64, hamming + 1)
    edges = np.linspace(0, 64, bands + 1).astype(int)
    found = [np.zeros((0, 2), np.int64)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        value = (hashes[idx] >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(value, kind="stable")
        cuts = np.nonzero(np.diff(value[order]))[0] + 1
        for bucket in np.split(idx[order], cuts):
            if len(bucket) > 1:
                found += _pairs_within(bucket, lambda rows, members: popcount(
                    hashes[rows][:, None] ^ hashes[members][None, :]) <= hamming)
    return _unique(found)


def rows_f32(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows of `x` (a float16 memory map of the run's unit vectors) as float32, read in order."""
    return np.asarray(x[np.sort(rows)] if len(rows) else x[:0], np.float32)[np.argsort(np.argsort(rows))]


def clusters(x: np.ndarray, quantizer=None, seed: int = 0) -> np.ndarray:
    """A cluster per row of `x`: the trained coarse quantizer's nearest centroid, or k-means' (trained
    on a sample, as faiss would subsample anyway); assigned a block at a time."""
    if quantizer is None:
        k = len(x) // KMEANS_POINTS
        if k < 2:
            return np.zeros(len(x), np.int64)
        import faiss
        kmeans = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True)
        rng = np.random.default_rng(seed)
        kmeans.train(rows_f32(x, rng.choice(len(x), min(len(x), k * 256), replace=False)))
        quantizer = kmeans.index
    out, block = np.zeros(len(x), np.int64), max(1, ASSIGN_ELEMENTS // x.shape[1])
    for start in range(0, len(x), block):
        _, assigned = quantizer.search(np.asarray(x[start:start + block], np.float32), 1)
        out[start:start + block] = assigned[:, 0]
    return out


def semantic_pairs(x: np.ndarray, assigned: np.ndarray, eps: float) -> np.ndarray:
    """(n, 2) index pairs in the same cluster with cosine similarity >= 1 - eps (rows unit length).
    One cluster's vectors in memory at a time."""
    order = np.argsort(assigned, kind="stable")
    cuts = np.nonzero(np.diff(assigned[order]))[0] + 1
    found = [np.zeros((0, 2), np.int64)]
    for members in np.split(order, cuts):
        if len(members) > 1:
            local = rows_f32(x, members)
            at = np.arange(len(members))
            pairs = _unique([np.zeros((0, 2), np.int64),
                             *_pairs_within(at, lambda rows, m: local[rows] @ local[m].T >= 1 - eps)])
            found.append(members[pairs])
    return _unique(found)


def choose(roots: np.ndarray, similarity: np.ndarray, keys: list[str]) -> dict[int, int]:
    """group root -> the row kept: highest similarity, ties by the smaller key."""
    best: dict[int, int] = {}
    score = np.nan_to_num(np.asarray(similarity, np.float64), nan=-np.inf)
    for row, root in enumerate(roots.tolist()):
        other = best.get(root)
        if other is None or (-score[row], keys[row]) < (-score[other], keys[other]):
            best[root] = row
    return best


def group(keys: list[str], similarity, pairs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(rows in a group of two or more, the kept row of each), unioned over every relation's pairs."""
    roots = components(len(keys), np.concatenate([np.zeros((0, 2), np.int64), *pairs]).astype(np.int64))
    sizes = np.bincount(roots, minlength=len(keys))
    rows = np.nonzero(sizes[roots] > 1)[0]
    kept = choose(roots[rows], np.asarray(similarity)[rows], [keys[r] for r in rows])
    return rows, np.array([rows[kept[r]] for r in roots[rows].tolist()], np.int64)
