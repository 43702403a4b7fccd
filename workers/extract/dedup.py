"""Dedup of a run's URLs: within a segment, and fleet-wide through Redis, where the segment
that first saw a URL owns it (so a redelivered segment keeps its own URLs). See ops/dedup.md
for the memory this takes at Common Crawl scale."""
from __future__ import annotations

import hashlib
import math

import redis
from xxhash import xxh3_64_digest

from clipfleet.shared.pipeline import TransientError
from clipfleet.shared.runconfig import RunConfig


def url_digest(text: str) -> bytes:
    """8 bytes identify a URL: at 50 billion URLs about 70 pairs collide (n^2 / 2^65).
    XXH3 is a well-mixed 64-bit hash, several times faster than BLAKE2b here; a digest only
    names a URL in the run's claims, and no one needs to recompute it from outside."""
    return xxh3_64_digest(text.encode("utf-8", "surrogatepass"))


# A URL is claimed by the first segment that sees it; the claim stores that segment's
# number, so the same segment run again (a redelivered task) keeps what it claimed.
# The batch travels as one string of 8-byte digests and comes back as one string of
# "1" (ours) and "0" (another segment's): packing thousands of separate arguments and
# replies costs more in redis-py than the claims cost in Redis.
_CLAIM_SCRIPT = """
local owner, prefix, buckets, digests = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local kept = {}
for i = 1, #digests, 8 do
  local field = string.sub(digests, i, i + 7)
  local b1, b2, b3, b4 = string.byte(field, 1, 4)
  local bucket = math.floor((((b1 * 256 + b2) * 256 + b3) * 256 + b4) / (4294967296 / buckets))
  local key = prefix .. string.format('%x', bucket)
  if redis.call('HSETNX', key, field, owner) == 1 or redis.call('HGET', key, field) == owner then
    kept[#kept + 1] = '1'
  else
    kept[#kept + 1] = '0'
  end
end
return table.concat(kept)
"""

# Claims live in Redis hashes ("buckets") of about this many URLs: a small hash is stored as
# one compact list, far smaller than one Redis key per URL (see ops/dedup.md).
URLS_PER_BUCKET = 64
URLS_PER_SEGMENT = 400_000  # a Common Crawl WAT yields a few hundred thousand image links


def bucket_bits(segments: int) -> int:
    """log2 of the bucket count for a run of `segments` WATs; fixed for the run's life."""
    wanted = max(1, segments) * URLS_PER_SEGMENT / URLS_PER_BUCKET
    return max(8, min(32, math.ceil(math.log2(wanted))))


def dedup_namespace(cfg: RunConfig) -> str:
    """Redis key prefix of one run: its store and creation time, so a new run in the same
    store (after the old one was deleted) does not inherit old claims."""
    return "cf:dedup:" + hashlib.sha1(f"{cfg.store}\n{cfg.created_at!r}".encode()).hexdigest()[:12]


class RunDedup:
    """Fleet-wide claims of URL digests in Redis, one script call per batch.

    A digest's bucket is its first 32 bits scaled to 2**bits buckets; the bucket key is
    `namespace:hex(bucket)`, and the digest itself is the field.
    """

    def __init__(self, client, namespace: str, bits: int):
        self.client = client
        self.namespace = namespace
        self.buckets = 2 ** bits
        self._script = client.register_script(_CLAIM_SCRIPT)

    def bucket_key(self, digest: bytes) -> str:
        """The hash a digest's claim lives in (to look up who owns a URL; ops/dedup.md)."""
        bucket = int.from_bytes(digest[:4], "big") // (2**32 // self.buckets)
        return f"{self.namespace}:{bucket:x}"

    def claim(self, digests: list[bytes], owner: int) -> list[bool]:
        """For each digest: True when `owner` holds it (claimed now or by an earlier run of
        the same segment), False when another segment got there first."""
        if not digests:
            return []
        try:
            kept = self._script(keys=[], args=[owner, f"{self.namespace}:", self.buckets, b"".join(digests)])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise TransientError(f"dedup claims failed: {exc}") from exc
        return [byte == 49 for byte in kept]  # b"1"
