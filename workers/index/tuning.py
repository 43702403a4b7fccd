"""Search parameters for the query-time budget, and the recall and latency index/infos.json reports.

Recall is measured as autofaiss's users asked for it: against exact search, with held-out query
vectors that are not in the index (the text embeddings of sampled samples for the image index: what
a text-to-image query looks like), not with vectors taken from the index itself.

  recall@1   the exact nearest neighbour is the first result
  recall@10  the exact nearest neighbour is among the first 10 results (faiss's 1-recall@10)
  10-recall@10  share of the exact 10 nearest neighbours among the first 10 results

Parameters: the knob autofaiss tunes (nprobe for IVF, with the HNSW quantizer's efSearch at
2 x nprobe as autofaiss sets it; efSearch for HNSW), tried on a doubling grid. Latency is the
median time of one query at a time on one thread (a server answers one request per call; the
median, because a machine shared with other work makes the mean swing with every stall). The
choice is the smallest setting whose recall@10 and 10-recall@10 are both within 0.002 of the best
settings that keep the median within `--index-query-ms`: autofaiss maximises recall under the budget; this also stops
spending latency once recall has saturated (the grid stops after two doublings that gain nothing).
"""
from __future__ import annotations

import re
import time

import faiss
import numpy as np

SATURATED = 0.002
LATENCY_QUERIES = 200


def grid(index: faiss.Index, key: str) -> list[str]:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        hnsw_quantizer = re.search(r"IVF\d+_HNSW", key) is not None
        out, n = [], 1
        while n <= min(ivf.nlist, 4096):
            out.append(f"nprobe={n}" + (f",quantizer_efSearch={max(2 * n, 16)}" if hnsw_quantizer else ""))
            n *= 2
        return out
    if "HNSW" in key:
        return [f"efSearch={e}" for e in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    return [""]


def apply(index: faiss.Index, params: str) -> None:
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


def recalls(found: np.ndarray, exact: np.ndarray) -> dict:
    """recall@1, recall@10 and 10-recall@10 of `found` ids against `exact` ids (both nq x >=10)."""
    nn = exact[:, :1]
    k = min(10, found.shape[1], exact.shape[1])
    inter = [len(np.intersect1d(f[:k], e[:k][e[:k] >= 0])) / max(1, int((e[:k] >= 0).sum()))
             for f, e in zip(found, exact)]
    return {"recall@1": float(np.mean(found[:, 0] == nn[:, 0])),
            "recall@10": float(np.mean((found[:, :10] == nn).any(axis=1))),
            "10-recall@10": float(np.mean(inter))}


def latencies_ms(index: faiss.Index, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """One query per call on one thread, as a server answering concurrent requests runs them
    (OpenMP's thread team costs more than it saves on a single query)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        out = np.empty(len(queries))
        for i in range(len(queries)):
            started = time.perf_counter()
            index.search(queries[i:i + 1], k)
            out[i] = (time.perf_counter() - started) * 1000
        return out
    finally:
        faiss.omp_set_num_threads(threads)


def tune(index: faiss.Index, key: str, queries: np.ndarray, exact_ids: np.ndarray, budget_ms: float) -> dict:
    """Pick the search parameters (see the module doc); returns them with what was measured."""
    tried, stale = [], 0
    for params in grid(index, key):
        apply(index, params)
        _, found = index.search(queries, 10)
        p50 = float(np.median(latencies_ms(index, queries[:LATENCY_QUERIES])))
        point = {"params": params, "p50_ms": round(p50, 4), **recalls(found, exact_ids)}
        gained = not tried or any(point[r] > max(t[r] for t in tried) + SATURATED
                                  for r in ("recall@10", "10-recall@10"))
        stale = 0 if gained else stale + 1
        tried.append(point)
        if p50 > budget_ms or point["recall@10"] >= 1.0 or stale >= 2:
            break  # slower settings only get slower; nothing beats every neighbour found; or saturated
    within = [t for t in tried if t["p50_ms"] <= budget_ms] or tried[:1]
    best = max(t["recall@10"] for t in within)
    best_all10 = max(t["10-recall@10"] for t in within)
    choice = next(t for t in within if t["recall@10"] >= best - SATURATED
                  and t["10-recall@10"] >= best_all10 - SATURATED)
    apply(index, choice["params"])
    return {"params": choice["params"], "tried": tried}


def measure(index: faiss.Index, queries: np.ndarray, exact_ids: np.ndarray) -> dict:
    """Recall and single-query latency at the index's current parameters."""
    _, found = index.search(queries, 10)
    ms = latencies_ms(index, queries)
    return {**{k: round(v, 4) for k, v in recalls(found, exact_ids).items()},
            "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 4),
                           "p99": round(float(np.percentile(ms, 99)), 4),
                           "mean": round(float(ms.mean()), 4)}}
