"""Dedup of a run's URLs: within a segment, and fleet-wide through Redis, where the segment
that first saw a URL owns it (so a redelivered segment keeps its own URLs). The claims may
live on the broker's Redis, on a list of Redis nodes partitioned by digest, or on a Redis
Cluster (dedup_nodes.py). See ops/dedup.md for the layout and the memory it takes."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import redis
from xxhash import xxh3_64_digest

from clipfleet.shared.pipeline import TransientError
from clipfleet.shared.runconfig import RunConfig
from clipfleet.workers.extract.dedup_nodes import GROUPS, GROUP_BITS, ClaimNodes, connect, group_tag


def url_digest(text: str) -> bytes:
    """8 bytes identify a URL: at 50 billion URLs about 70 pairs collide (n^2 / 2^65).
    XXH3 is a well-mixed 64-bit hash, several times faster than BLAKE2b here; a digest only
    names a URL in the run's claims, and no one needs to recompute it from outside."""
    return xxh3_64_digest(text.encode("utf-8", "surrogatepass"))


# Layout (ops/dedup.md): a digest's top `bits` bits pick its bucket, a Redis hash; the next
# SUB_BITS pick a page family inside it; the next 32 bits are stored, with the owning
# segment in 3 bytes: a 7-byte record. A page (hash field) holds up to PAGE_RECORDS records,
# so its value stays under Redis's 64-byte limit for a compact (ziplist/listpack) hash; a
# full page continues in the field `sub, level`. Every key is declared, and the keys of one
# call share one hash tag (one cluster slot).
# The batch travels as three strings (page families, suffixes, key indices) and comes back
# as one string of "1" (ours) and "0" (another segment's): packing thousands of separate
# arguments and replies costs more in redis-py than the claims cost in Redis.
_CLAIM_SCRIPT = """
local owner, subs, sufs, idx = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local page_bytes = tonumber(ARGV[5])
local kept = {}
for i = 1, #subs do
  local hi, lo = string.byte(idx, 2 * i - 1, 2 * i)
  local key = KEYS[hi * 256 + lo + 1]
  local sub = string.sub(subs, i, i)
  local suf = string.sub(sufs, 4 * i - 3, 4 * i)
  local level, mine = 0, nil
  while mine == nil do
    local field = sub
    if level > 0 then field = sub .. string.char(level) end
    local page = redis.call('HGET', key, field)
    if not page then
      redis.call('HSET', key, field, suf .. owner)
      mine = '1'
    else
      local at = string.find(page, suf, 1, true)
      while at and (at - 1) % 7 ~= 0 do  -- a match across two records is no match
        at = string.find(page, suf, at + 1, true)
      end
      if at then
        mine = (string.sub(page, at + 4, at + 6) == owner) and '1' or '0'
      elseif #page < page_bytes then
        redis.call('HSET', key, field, page .. suf .. owner)
        mine = '1'
      else
        level = level + 1
      end
    end
  end
  kept[i] = mine
end
return table.concat(kept)
"""

SUB_BITS = 5             # 32 page families per bucket
SUFFIX_BITS = 32         # stored per URL: a new URL meets a stored one by chance ~ 1 in 2^32 / page family
RECORD_BYTES = 7         # 4-byte suffix + 3-byte owner
PAGE_RECORDS = 9         # 63 bytes: Redis keeps a hash compact while each value is <= 64 bytes
MAX_OWNER = 2**24 - 1    # the owner is a segment number in 3 bytes
MAX_BITS = 64 - SUB_BITS - SUFFIX_BITS
MAX_BATCH = 50_000       # digests per call

# Buckets of about this many URLs: enough that a key's own cost (~100 B) is small per URL,
# few enough that a bucket stays one compact hash (<= 512 fields) even at 15x the estimate.
URLS_PER_BUCKET = 256
URLS_PER_SEGMENT = 400_000  # a Common Crawl WAT yields a few hundred thousand image links


def bucket_bits(segments: int, urls_per_segment: int = URLS_PER_SEGMENT) -> int:
    """log2 of the bucket count for a run of `segments` WATs; fixed for the run's life.
    Rounded down: a bucket of 256-512 URLs costs less per URL than one of 128-256."""
    wanted = max(1, segments) * urls_per_segment / URLS_PER_BUCKET
    return max(GROUP_BITS + 2, min(MAX_BITS, math.floor(math.log2(max(wanted, 1)))))


def dedup_namespace(cfg: RunConfig) -> str:
    """Redis key prefix of one run: its store and creation time, so a new run in the same
    store (after the old one was deleted) does not inherit old claims."""
    return "cf:dedup:" + hashlib.sha1(f"{cfg.store}\n{cfg.created_at!r}".encode()).hexdigest()[:12]


def claims_redis(options, broker):
    """Where a run's claims live: its --dedup-redis nodes, else `broker()`'s Redis."""
    if not options.dedup_redis:
        return broker()
    try:
        return connect(options.dedup_redis)
    except ClaimNodes.TRANSIENT as exc:
        raise TransientError(f"dedup claims: {exc}") from exc


class RunDedup:
    """Fleet-wide claims of URL digests in Redis, one script call per node (or cluster slot
    group) per batch. `client`: a redis.Redis, a list of them (partitioned by digest), a
    RedisCluster, or a ClaimNodes."""

    def __init__(self, client, namespace: str, bits: int):
        if not GROUP_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bucket bits must be {GROUP_BITS}..{MAX_BITS}, not {bits}")
        self.nodes = client if isinstance(client, ClaimNodes) else ClaimNodes.of(client)
        self.namespace = namespace
        self.bits = bits
        self._script = self.nodes.register_script(_CLAIM_SCRIPT)
        # key names of a group's buckets: "<namespace>:{<tag>}<bucket hex>"
        self._prefixes = [f"{namespace}:{{{group_tag(g)}}}" for g in range(GROUPS)]

    def bucket_key(self, digest: bytes) -> str:
        """The hash a digest's claim lives in (to look up who owns a URL; ops/dedup.md)."""
        bucket = int.from_bytes(digest, "big") >> (64 - self.bits)
        return self._prefixes[bucket >> (self.bits - GROUP_BITS)] + f"{bucket:x}"

    def locate(self, digest: bytes) -> tuple[str, bytes, bytes]:
        """(key, first field, 4 stored bytes) of a digest's claim."""
        d = int.from_bytes(digest, "big")
        sub = (d >> (64 - self.bits - SUB_BITS)) & (2**SUB_BITS - 1)
        suffix = (d >> (64 - self.bits - SUB_BITS - SUFFIX_BITS)) & 0xFFFFFFFF
        return self.bucket_key(digest), bytes([sub]), suffix.to_bytes(4, "big")

    def owner_of(self, digest: bytes) -> int | None:
        """The segment holding a digest's claim, or None (reads every page of its family)."""
        key, sub, suffix = self.locate(digest)
        client = self.nodes.client_for(key, digest[0] >> (8 - GROUP_BITS))
        level = 0
        while True:
            page = client.hget(key, sub + (bytes([level]) if level else b""))
            if page is None:
                return None
            for at in range(0, len(page), RECORD_BYTES):
                if page[at:at + 4] == suffix:
                    return int.from_bytes(page[at + 4:at + 7], "big")
            level += 1

    def claim(self, digests: list[bytes], owner: int) -> list[bool]:
        """For each digest: True when `owner` holds it (claimed now or by an earlier run of
        the same segment), False when another segment got there first."""
        if not digests:
            return []
        if not 0 <= owner <= MAX_OWNER:
            raise ValueError(f"dedup owner (segment) {owner} is outside 0..{MAX_OWNER}")
        if len(digests) > MAX_BATCH:  # a call numbers its keys in 2 bytes
            return self.claim(digests[:MAX_BATCH], owner) + self.claim(digests[MAX_BATCH:], owner)
        d = np.frombuffer(b"".join(digests), dtype=">u8").astype(np.uint64)
        bucket = d >> np.uint64(64 - self.bits)
        subs = ((d >> np.uint64(64 - self.bits - SUB_BITS)) & np.uint64(2**SUB_BITS - 1)).astype(np.uint8)
        suffixes = ((d >> np.uint64(64 - self.bits - SUB_BITS - SUFFIX_BITS)) & np.uint64(0xFFFFFFFF)).astype(">u4")
        groups = (bucket >> np.uint64(self.bits - GROUP_BITS)).astype(np.int64)
        owner_bytes = owner.to_bytes(3, "big")
        calls = []
        for part, at in self.nodes.split(groups):
            buckets, index = np.unique(bucket[at], return_inverse=True)
            keys = [self._prefixes[int(b) >> (self.bits - GROUP_BITS)] + f"{int(b):x}" for b in buckets]
            args = [owner_bytes, subs[at].tobytes(), suffixes[at].tobytes(), index.astype(">u2").tobytes(),
                    PAGE_RECORDS * RECORD_BYTES]
            calls.append((part, keys, args, at))
        try:
            replies = self.nodes.run(self._script, [(part, keys, args) for part, keys, args, _ in calls])
        except self.nodes.TRANSIENT as exc:
            raise TransientError(f"dedup claims failed: {exc}") from exc
        kept = np.zeros(len(digests), dtype=bool)
        for (_, _, _, at), reply in zip(calls, replies):
            kept[at] = np.frombuffer(reply, dtype=np.uint8) == 49  # b"1"
        return kept.tolist()
