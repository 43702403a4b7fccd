"""The faiss side of the index stage: which index, training it, a shard's partial index, the merge.

Key: autofaiss's `get_optimal_index_keys_v2` for the run's (expected) vector count, dimension and
`--index-memory`, so a run gets what autofaiss would build: exact search under 1000 vectors, HNSW
while the graph fits the budget, IVF (with OPQ + PQ when the flat codes do not fit) beyond. Indices
are built with autofaiss's index_factory, which builds inner-product IVF-PQ correctly.

IVF indices are added to per shard: a shard's partial index is the trained empty index plus that
shard's codes, with the global ids; the serving index is faiss's `merge_ondisk` of all partials
(faiss's demo_ondisk_ivf): one small index file plus one .ivfdata file of inverted lists that
faiss memory-maps, so a serving machine pages in only the lists it probes. Flat and HNSW indices
are small by construction (autofaiss picks them only when they fit the budget), so their "merge"
adds the new shards' vectors to the previous serving index, wrapped in an IndexIDMap2 for ids.
"""
from __future__ import annotations

import os
import re

import faiss
import numpy as np

from clipfleet.workers.index.vectors import as_float32

METRIC = faiss.METRIC_INNER_PRODUCT   # vectors are L2-normalised: inner product = cosine
IVF_DATA = "merged.ivfdata"
INDEX_FILE = "merged.index"


def threads(n: int | None = None) -> None:
    """faiss's OpenMP threads: the cores this worker has (the index queue runs one process), or
    CLIPFLEET_INDEX_THREADS (on a machine shared with other work, OpenMP's spinning thread team
    can cost more than a single thread)."""
    n = n or int(os.environ.get("CLIPFLEET_INDEX_THREADS") or 0) or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(n)


def choose_key(nb_vectors: int, dim: int, memory: str, override: str = "") -> str:
    if override:
        return override
    from autofaiss.external.optimize import get_optimal_index_keys_v2
    keys = get_optimal_index_keys_v2(nb_vectors, dim, memory)
    if not keys:
        raise ValueError(f"no index of {nb_vectors} x {dim} vectors fits --index-memory {memory}; "
                         "raise it or pass --index-key")
    return keys[0]


def needs_training(key: str) -> bool:
    return "IVF" in key or "IMI" in key or re.search(r"(^|,)O?PQ", key) is not None


def train_size(nb_vectors: int, key: str, memory: str, dim: int) -> int:
    """Vectors to train on, as autofaiss sizes it (about 100 per IVF cluster, fewer when memory
    is short), never more than the run has."""
    if "IVF" not in key and "IMI" not in key:
        return min(nb_vectors, 2 ** 16)
    from autofaiss.external.optimize import get_optimal_train_size
    return min(get_optimal_train_size(nb_vectors, key, memory, dim), nb_vectors)


# OPQ's rotation is learnt from a sample of 32 768 training vectors, not faiss's 65 536, in faiss's
# 50 rounds. At 200 000 x 768 (OPQ32_224,IVF2048_HNSW32,PQ32x8, 63 488 training vectors) the rotation
# was 195 of training's 234 CPU seconds; the sample halves it and keeps recall@10 (0.264 vs 0.263 at
# fixed search parameters). Fewer rounds instead (25) cost as much and lost recall on some CPUs
# (0.94 vs 0.98 on a small world with AVX2 kernels): the rounds are where OPQ converges.
OPQ_TRAIN_POINTS = 32_768


def empty_index(dim: int, key: str) -> faiss.Index:
    from autofaiss.indices.index_factory import index_factory
    try:
        index = index_factory(dim, key, METRIC)
    except ValueError:  # a key autofaiss has no inner-product recipe for (from --index-key)
        index = faiss.index_factory(dim, key, METRIC)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.max_train_points = OPQ_TRAIN_POINTS
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return faiss.IndexIDMap2(index)  # HNSW and Flat keep ids beside; IVF stores them in its lists
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQ):
        # faiss's factory turns on polysemous training for "IVFn,PQm"; search never uses it (no
        # Hamming threshold is set) and it costs more than the rest of training together
        ivf.do_polysemous_training = False
    return index


def is_ivf(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


def train(dim: int, key: str, vectors: np.ndarray) -> faiss.Index:
    index = empty_index(dim, key)
    if not index.is_trained:
        if len(vectors) == 0:
            raise ValueError(f"{key} needs training vectors and the run has none")
        index.train(as_float32(vectors))
    return index


def write(index: faiss.Index, path) -> None:
    faiss.write_index(index, str(path))


def read(path, mmap: bool = False) -> faiss.Index:
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)


def partial(trained_path, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """The trained empty index holding one shard's vectors under their global ids."""
    index = read(trained_path)
    for start in range(0, len(vectors), 65536):
        index.add_with_ids(as_float32(vectors[start:start + 65536]), ids[start:start + 65536])
    return index


def merge_ivf(trained_path, part_paths: list, out_dir) -> faiss.Index:
    """All partials into one index with on-disk inverted lists in out_dir (faiss merge_ondisk)."""
    from faiss.contrib.ondisk import merge_ondisk
    index = read(trained_path)
    merge_ondisk(index, [str(p) for p in part_paths], os.path.join(str(out_dir), IVF_DATA))
    write(index, os.path.join(str(out_dir), INDEX_FILE))
    return index
