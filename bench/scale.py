"""Scale figures: what the fleet-wide state costs as a run grows.

    python -m bench.scale dedup [--urls 10000000] [--redis URL]   # bytes of Redis per claimed URL
    python -m bench.scale dedup --quick                           # 1 M URLs, for a quick look
    python -m bench.scale state [--shards 1000,10000,100000] [--no-s3]   # run state (bench/scale_state.py)
    python -m bench.scale                                          # both, as `make bench` runs it

Dedup: claims `--urls` distinct URL digests through extract's RunDedup, in extract's batches and
with extract's bucket count for a run of that size (400 000 URLs a segment, each segment its own
owner), into a redis-server started here (no persistence) or the one given, and reads Redis's
own figures: INFO used_memory before and after, MEMORY USAGE of sampled buckets. It also counts
the URLs refused although new (a stored 32-bit suffix met by chance): the false-drop rate.
Results print and go to .bench/results.json under "scale" (`clipfleet plan --from-bench` reads them).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

RESULTS = Path(".bench") / "results.json"
BATCH = 2000  # extract's CLAIM_BATCH


@contextmanager
def _redis_server():
    from clipfleet.producer.fleet import scratch_redis
    with tempfile.TemporaryDirectory(prefix="clipfleet-scale-") as directory, scratch_redis(directory) as url:
        yield url


def dedup_bytes_per_url(redis_url: str, urls: int = 10_000_000, urls_per_segment: int = 400_000,
                        seed: int = 0, progress=None) -> dict:
    """Claim `urls` distinct digests as a run of urls/urls_per_segment segments would; Redis's
    memory per URL. The namespace is new (its keys are removed at the end)."""
    import redis

    from clipfleet.workers.extract.dedup import RunDedup, bucket_bits
    client = redis.Redis.from_url(redis_url)
    segments = max(1, -(-urls // urls_per_segment))
    bits = bucket_bits(segments, urls_per_segment)
    namespace = f"cf:dedup:bench{seed:07x}"
    dedup = RunDedup(client, namespace, bits)
    rng = np.random.default_rng(seed)
    before = client.info("memory")
    started, kept = time.perf_counter(), 0
    for start in range(0, urls, BATCH):
        n = min(BATCH, urls - start)
        # random 64-bit digests stand in for XXH3 of distinct URLs (a duplicate pair among 10 M:
        # about n^2 / 2^65 = 3e-6, so every one is a new URL)
        batch = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False).astype(">u8").tobytes()
        replies = dedup.claim([batch[i:i + 8] for i in range(0, 8 * n, 8)], owner=start // urls_per_segment)
        kept += sum(replies)
        if progress and (start // BATCH) % 500 == 0:
            progress(start + n)
    seconds = time.perf_counter() - started
    after = client.info("memory")
    keys = client.dbsize()
    sample = [k for _, k in zip(range(200), client.scan_iter(f"{namespace}:*", count=1000))]
    sampled_bytes = sum(client.memory_usage(k, samples=0) for k in sample)
    sampled_urls = sum(sum(len(v) for v in client.hvals(k)) // 7 for k in sample)
    encodings = sorted({client.object("encoding", k).decode() for k in sample})
    server = client.info("server")
    result = {
        "urls": urls, "segments": segments, "bucket_bits": bits, "buckets": keys,
        "bytes_per_url": round((after["used_memory"] - before["used_memory"]) / urls, 3),
        "memory_usage_bytes_per_url": round(sampled_bytes / max(1, sampled_urls), 3),
        "false_drops": urls - kept, "false_drop_rate": (urls - kept) / urls,
        "claims_per_s": round(urls / seconds), "seconds": round(seconds, 1), "encodings": encodings,
        "redis_version": server.get("redis_version"), "allocator": after.get("mem_allocator"),
        "used_memory_rss_per_url": round((after["used_memory_rss"] - before["used_memory_rss"]) / urls, 3),
    }
    for cursor_keys in _chunks(client.scan_iter(f"{namespace}:*", count=5000), 5000):
        client.unlink(*cursor_keys)
    return result


def _chunks(items, n):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def dedup(urls: int = 10_000_000, redis_url: str | None = None) -> dict:
    """The dedup figure, on a redis-server of our own unless one is given."""
    def progress(done):
        print(f"  {done:,} URLs claimed", flush=True)

    if redis_url:
        return dedup_bytes_per_url(redis_url, urls, progress=progress)
    with _redis_server() as url:
        return dedup_bytes_per_url(url, urls, progress=progress)


def write_results(part: str, numbers: dict, path: Path = RESULTS) -> None:
    """Merge {part: numbers} under "scale" in results.json, keeping every other result."""
    path.parent.mkdir(exist_ok=True)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    results.setdefault("scale", {})[part] = numbers
    path.write_text(json.dumps(results, indent=1, default=str))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    d = sub.add_parser("dedup", help="Redis bytes per claimed URL")
    d.add_argument("--urls", type=int, default=10_000_000, help="URLs to claim (default 10 M)")
    d.add_argument("--quick", action="store_true", help="1 M URLs")
    d.add_argument("--redis", help="measure on this Redis (a fresh namespace, removed after) instead of our own")
    d.add_argument("--out", default=str(RESULTS), help="results file (default .bench/results.json)")
    st = sub.add_parser("state", help="status, progress tick and store calls per task at 1k-100k shards")
    st.add_argument("--shards", default="1000,10000,100000", help="shard counts, comma list (default %(default)s)")
    st.add_argument("--no-s3", action="store_true", help="the local store only")
    if argv is None:  # `make bench` calls main(): both parts, at the bench sizes
        from bench.sizes import size
        biggest = size("SCALE_SHARDS")
        shards = ",".join(str(n) for n in sorted({max(100, biggest // 100), max(100, biggest // 10), biggest}))
        return {**main(["dedup", "--urls", str(size("SCALE_DEDUP_URLS"))]), **main(["state", "--shards", shards])}
    args = parser.parse_args(argv)
    if args.part == "state":
        from bench import scale_state
        numbers = scale_state.main([int(n) for n in args.shards.split(",")], s3=not args.no_s3)
        write_results("state", numbers)
        return {"state": numbers,
                "status_local_vs_5s_goal_ratio": round(5.0 / max(numbers["status_local_s_at_max"], 1e-3), 2),
                **({"status_s3_vs_20s_goal_ratio": round(20.0 / max(numbers["status_s3_s_at_max"], 1e-3), 2)}
                   if "status_s3_s_at_max" in numbers else {})}
    urls = 1_000_000 if args.quick else args.urls
    if urls < 1:
        parser.error("--urls must be positive")
    numbers = dedup(urls, args.redis)
    print(f"dedup: {numbers['bytes_per_url']:.2f} B per URL (INFO used_memory), "
          f"{numbers['memory_usage_bytes_per_url']:.2f} B (MEMORY USAGE of {min(200, numbers['buckets'])} buckets) "
          f"at {numbers['urls']:,} URLs in {numbers['buckets']:,} buckets; "
          f"{numbers['false_drops']} false drops ({numbers['false_drop_rate']:.2e}); "
          f"{numbers['claims_per_s']:,} claims/s; redis {numbers['redis_version']} ({numbers['allocator']})")
    write_results("dedup", numbers, Path(args.out))
    return {"dedup": numbers}


if __name__ == "__main__":
    main(sys.argv[1:] or None)
