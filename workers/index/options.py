"""Options of the index stage (flags of `clipfleet run`, section `index` of run.json)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from clipfleet.shared.options import not_negative, option, positive

_MEMORY = re.compile(r"^\d+(\.\d+)?[KMGT]B?$", re.IGNORECASE)


def _memory(value: str) -> str | None:
    return None if _MEMORY.match(str(value)) else f"a size such as 4G, 512M or 1T, got {value!r}"


def _fraction(value) -> str | None:
    return None if value is None or 0 <= value < 1 else f"must be in [0, 1), got {value}"


# Where a run's own calibration (workers/index/calibration.py) cannot start from copies, and the ceiling
# of its Hamming threshold: on the sandbox world re-encoded, halved and 3%-cropped copies come within 6
# bits of their original, its closest distinct pictures 10 bits apart. Tighter than download's
# PHASH_DISTANCE (10): across a run every pair is a chance of a false match.
DEDUP_HAMMING = 8
DEDUP_EPS = 0.05


@dataclass
class IndexOptions:
    index_memory: str = option("4G", "size budget of the serving index; autofaiss picks the index key for it "
                                     "(exact or HNSW when it fits, else IVF with product quantization)",
                               metavar="SIZE", check=_memory)
    index_query_ms: float = option(10.0, "query time budget: the median ms of one query, on one thread, the search parameters are tuned to",
                                   check=positive)
    index_train_after: int = option(1_000_000, "train the index once this many vectors are embedded (or when "
                                                "the run's last shard is embedded, whichever comes first)",
                                    check=positive)
    index_expected_vectors: int = option(0, "vectors the run will have in the end, for the index key; 0 estimates "
                                            "it from the shards embedded so far and the shards expected",
                                         check=not_negative)
    index_train_memory: str = option("8G", "memory for training; bounds the training sample as autofaiss does",
                                     metavar="SIZE", check=_memory)
    index_key: str = option("", "a faiss index key to use instead of autofaiss's pick (e.g. OPQ64_256,IVF16384_HNSW32,PQ64x8)",
                            metavar="KEY")
    index_eval_queries: int = option(1000, "held-out queries (text embeddings, never in the image index) for "
                                           "recall and latency in index/infos.json; 0 skips the measurement",
                                     check=not_negative)
    index_text: bool = option(False, "also build a text index (text embeddings; for modality=text search)")
    index_seed: int = option(0, "seed of the training sample and the held-out queries")
    near_dup_hamming: int | None = option(None, "near-duplicates: pictures whose 64-bit perceptual hashes differ in at "
                                                "most this many bits (default: calibrated on the run's own pictures, "
                                                "see run.json near_duplicates)", check=not_negative)
    near_dup_eps: float | None = option(None, "near-duplicates: samples in one coarse cluster whose image embeddings' "
                                              "cosine similarity is >= 1 - eps (SemDeDup's eps; default: calibrated "
                                              "for the run's model on copies of its own pictures, 0 when the model "
                                              "cannot tell copies apart, see run.json near_duplicates)",
                                        check=_fraction)
    drop_near_duplicates: bool = option(False, "leave near-duplicates out of dataset/ (by default they are published, "
                                               "`duplicate_of` naming the sample kept for their group)")
