"""Prometheus metrics of the search service. With several server processes, each writes its
samples under PROMETHEUS_MULTIPROC_DIR (set by `serve` before the workers start) and /metrics
adds them up, so any worker answers a scrape for all of them."""
from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
COUNT_BUCKETS = (0, 1, 10, 40, 100, 300, 1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000)

REQUEST_SECONDS = Histogram("clipfleet_search_request_seconds", "Request latency per endpoint",
                            ["endpoint"], buckets=LATENCY_BUCKETS)
REQUESTS = Counter("clipfleet_search_requests", "Requests per endpoint and status code", ["endpoint", "status"])
STEP_SECONDS = Histogram("clipfleet_search_step_seconds", "Time per step of a knn query (embed, search, metadata)",
                         ["step"], buckets=LATENCY_BUCKETS)
RESULTS = Histogram("clipfleet_search_results", "Results returned per knn query", buckets=COUNT_BUCKETS)
DEPTH = Histogram("clipfleet_search_depth", "Candidates searched per knn query (deeper when filters remove results)",
                  buckets=COUNT_BUCKETS)
DEPTH_RATIO = Histogram("clipfleet_search_depth_ratio", "Candidates searched per result asked",
                        buckets=(1, 1.5, 2, 3, 5, 10, 30, 100, 1000))
SHORT = Counter("clipfleet_search_short_results", "knn queries that returned fewer results than asked, "
                                                  "by reason", ["reason"])


def exposition() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
