"""Retry shards: the transient download failures of a finished shard, fetched again in a shard of
their own (`clipfleet retry-failed`, producer/retry_failed.py).

A retry shard's id derives from the shard it retries, never from a counter: RETRY_OFFSET + shard,
above any id a WAT segment (segment x 1000 + part) or a URL input gives. A URL is retried once:
a retry shard's own failures are final, so running retry-failed again fetches nothing new. Its
URL file (urls/{id}.parquet) is what marks a shard as retried; the pipeline expects every retry
shard found there (shard_state), so it flows through the later stages and the final index merge.
"""
from __future__ import annotations

RETRY_OFFSET = 10 ** 10

# Failures worth another try later: the host or the network, not the image or a refusal.
# robots.txt / tdmrep.json "unreachable" refusals hold a host's URLs back only until the file is
# asked again (RFC 9309 2.3.1.4), so they are retried too; refusals by a rule never are.
TRANSIENT_PREFIXES = ("timeout", "dns error", "connection error", "connection refused", "http 408", "http 425",
                      "http 429", "http 5", "robots.txt unreachable", "tdmrep.json unreachable")
TRANSIENT_MARKS = (" asked to wait ",)  # a host's Retry-After beyond what we wait (politeness.HostHeldOff)


def retry_shard(shard: int) -> int:
    return RETRY_OFFSET + int(shard)


def is_retry(shard) -> bool:
    return int(shard) >= RETRY_OFFSET


def transient(error_message: str | None) -> bool:
    if not error_message:
        return False
    return error_message.startswith(TRANSIENT_PREFIXES) or any(m in error_message for m in TRANSIENT_MARKS)


def retry_shard_names(store) -> set[str]:
    """Names of the retry shards whose URL files exist."""
    return {n[:-len(".parquet")] for n in store.list("urls")
            if n.endswith(".parquet") and n[:-len(".parquet")].isdigit() and is_retry(n[:-len(".parquet")])}
