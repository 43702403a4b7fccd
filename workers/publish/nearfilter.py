"""`clipfleet refilter --keep-near TARGETS`: DataComp's image-based filter (Gadre et al. 2023).

The run's image embeddings are clustered with k-means (faiss, fixed seed); every target vector
votes for the cluster whose centroid is nearest to it; samples in a voted cluster are kept. DataComp
clustered its pool into 100k clusters and voted with ImageNet's training images. Targets are a .npy
of vectors in the run's embedding space, or captions and images embedded by the run's own model.

Default cluster count: round(sqrt(n)) for n embedded samples. Clusters then grow as fast as their
number (both sqrt(n)), so a vote keeps about 1/sqrt(n) of the run whatever its size, and at
DataComp's 12.8B pool it gives 113k, the paper's 100k. k-means trains on at most TRAIN_PER_CLUSTER
samples a cluster (faiss's own default cap), drawn per shard with a seeded RNG, so its memory is
O(K) not O(n); every sample is then assigned shard by shard.
"""
from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np

from clipfleet.shared import layout
from clipfleet.shared.storage import Store

SEED = 1234  # fixed: the same run and targets always give the same clusters
NITER = 20  # faiss's default
TRAIN_PER_CLUSTER = 256  # faiss.Kmeans' max_points_per_centroid


def default_clusters(n: int) -> int:
    return max(1, round(math.sqrt(n)))


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def read_targets(values: list[str], model: str, store_uri: str) -> tuple[list[str], np.ndarray]:
    """(labels, L2-normalised float32 vectors) from --keep-near values: a .npy file (rows are
    vectors), a .txt file (one caption a line), an image or a folder of images, or a caption."""
    labels, vectors, captions, pictures = [], [], [], []
    for value in values:
        path = Path(value)
        if path.suffix in (".npy", ".txt", *IMAGE_SUFFIXES) and not path.is_file():  # a typo is not a caption
            raise ValueError(f"--keep-near: no such file: {value}")
        if path.is_dir() or path.suffix in IMAGE_SUFFIXES:
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
            if not found:
                raise ValueError(f"--keep-near: no image ({', '.join(IMAGE_SUFFIXES)}) in {value}")
            labels.append(f"{path.name} ({len(found)} images)")
            pictures += found
        elif path.suffix == ".npy":
            array = np.atleast_2d(np.load(path)).astype(np.float32)
            labels.append(f"{path.name} ({len(array)} vectors, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]})")
            vectors.append(array)
        elif path.suffix == ".txt":
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            labels.append(f"{path.name} ({len(lines)} captions)")
            captions += lines
        else:
            labels.append(repr(value))
            captions.append(value)
    if captions or pictures:  # the run's model: targets land in the space its images were embedded in
        vectors += _embedded(model, store_uri, captions, pictures)
    out = np.concatenate(vectors)
    return labels, out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _embedded(model: str, store_uri: str, captions: list[str], pictures: list[Path]) -> list[np.ndarray]:
    import torch
    from PIL import Image
    from clipfleet.shared.models.cache import copy_to_machine
    from clipfleet.shared.models.runtime import encoder
    copy_to_machine([model], store_uri)
    enc = encoder(model, "cpu", "fp32", 1)  # fp32 on CPU: the same vectors every time
    out = [enc.texts(captions).numpy()] if captions else []
    if pictures:  # the model's own preprocessing, as the embed stage applies it
        pixels = torch.stack([enc.preprocess(Image.open(p).convert("RGB")) for p in pictures])
        out.append(enc.images(pixels).numpy())
    return out


def _embeddings(store: Store, shard: int) -> np.ndarray:
    return np.load(io.BytesIO(store.read_bytes(layout.image_embeddings(shard)))).astype(np.float32)


def near(store: Store, sizes: dict[int, int], targets: np.ndarray, clusters: int | None) -> tuple[set, dict]:
    """({(shard, row)} in a cluster some target voted for, summary) over the embedded samples
    (`sizes`: shard -> rows of its embeddings)."""
    import faiss
    n = sum(sizes.values())
    if not n:
        raise ValueError("--keep-near: the run embedded no sample; nothing to cluster")
    k = min(clusters or default_clusters(n), n)
    share = min(1.0, k * TRAIN_PER_CLUSTER / n)
    sample = []
    for shard, rows in sorted(sizes.items()):
        pick = np.random.default_rng([SEED, shard]).random(rows) < share
        sample.append(_embeddings(store, shard)[pick])
    sample = np.concatenate(sample)
    if targets.shape[1] != sample.shape[1]:
        raise ValueError(f"--keep-near: the targets have {targets.shape[1]} dimensions, the run's image "
                         f"embeddings {sample.shape[1]}: embed them with the run's model")
    kmeans = faiss.Kmeans(sample.shape[1], k, niter=NITER, seed=SEED, max_points_per_centroid=TRAIN_PER_CLUSTER,
                          min_points_per_centroid=1)  # a small run still clusters, without faiss's warning
    kmeans.train(sample)
    voted = np.unique(kmeans.index.search(targets, 1)[1].ravel())
    keep = set()
    for shard in sorted(sizes):
        assigned = kmeans.index.search(_embeddings(store, shard), 1)[1].ravel()
        keep.update((shard, int(row)) for row in np.flatnonzero(np.isin(assigned, voted)))
    return keep, {"clusters": k, "seed": SEED, "clusters_kept": len(voted), "embedded": n, "near": len(keep)}
