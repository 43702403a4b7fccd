"""Local reuse of freed politeness slots, and the shard writer's in-memory reorder buffer."""
from __future__ import annotations

import pyarrow as pa
import redis

from clipfleet.workers.download.politeness import DomainLimiter, DomainLimits
from clipfleet.workers.download.writer import ShardWriter


def test_freed_slot_is_reused_without_a_round_trip_and_still_counts(redis_url):
    a = DomainLimiter(redis.Redis.from_url(redis_url), DomainLimits(max_concurrency=1, max_rate=0))
    b = DomainLimiter(redis.Redis.from_url(redis_url), DomainLimits(max_concurrency=1, max_rate=0))
    token = a.acquire("reuse.example")
    a.release("reuse.example", token)
    assert a.acquire("reuse.example") == token  # handed back locally
    assert not b.try_acquire("reuse.example", "b1")[0]  # still held fleet-wide
    a.release("reuse.example", token)
    a.flush()
    assert b.try_acquire("reuse.example", "b1")[0]


def test_no_local_reuse_during_a_hold_off(redis_url):
    a = DomainLimiter(redis.Redis.from_url(redis_url), DomainLimits(max_concurrency=2, max_rate=0))
    token = a.acquire("held.example")
    a.hold_off("held.example", 0.3)
    a.release("held.example", token)
    assert a.acquire("held.example") != token  # waited for Redis, which knew of the hold-off


def _tar(tmp_path, name, bound):
    out = tmp_path / name
    out.mkdir()
    writer = ShardWriter(out, 0, pa.schema([("url", pa.string())]), "jpg", memory_bound=bound)
    for index in [3, 1, 4, 0, 2, 6, 5]:
        meta = {"url": f"u{index}", "key": f"{index:09d}", "status": "success", "error_message": None,
                "width": 1, "height": 1, "original_width": 1, "original_height": 1, "sha256": None}
        writer.add(index, meta, None if index == 4 else bytes([index]) * 1000)
    writer.close({})
    assert not list(out.glob("*.spool"))
    return (out / "00000.tar").read_bytes()


def test_memory_bound_and_spool_write_the_same_tar(tmp_path):
    assert _tar(tmp_path, "memory", 1 << 20) == _tar(tmp_path, "spool", 0) == _tar(tmp_path, "mixed", 1500)
