"""Fleet-wide politeness per domain, shared through Redis by every download worker.

Three limits per host, checked and taken in one Lua script so that two workers never both
take the last slot:
- concurrency: a sorted set of request tokens scored by their expiry, so the slots of a
  worker killed mid-request free themselves after `slot_ttl` seconds;
- rate: the next time a request may start; a caller reserves the next free start time and
  sleeps until it, so waiting callers are served in turn rather than by polling races;
- hold-off: a time before which nobody asks the host again, set from Retry-After.
Times are Redis server time, so workers on machines with skewed clocks agree.
"""
from __future__ import annotations

import random
import threading
from collections import deque
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

PREFIX = "clipfleet:polite"

# KEYS: slots zset, next-start key, hold-off key, then slot zsets to release a token from.
# ARGV: token, max concurrency (0 = none), min interval s (0 = none), slot ttl s, then the
# tokens to release (one per extra key).
# Returns {1, wait_s} when a slot is taken (start after wait_s), {0, retry_in_s} when not.
_ACQUIRE = """
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], ARGV[i + 1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local limit, interval, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local hold = tonumber(redis.call('GET', KEYS[3]) or '0')
if hold > now then return {0, tostring(hold - now)} end
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= limit then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, tostring(math.min(0.05, tonumber(first[2]) - now))}
  end
end
local start = now
if interval > 0 then
  start = math.max(now, tonumber(redis.call('GET', KEYS[2]) or '0'))
  redis.call('SET', KEYS[2], tostring(start + interval), 'PX', math.ceil((start - now + interval) * 1000) + 1000)
end
if limit > 0 then
  redis.call('ZADD', KEYS[1], start + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.ceil((start - now + ttl) * 1000) + 60000)
end
return {1, tostring(start - now)}
"""

# KEYS: hold-off key. ARGV: seconds. Extends, never shortens, the hold-off.
_HOLD_OFF = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local untl = now + tonumber(ARGV[1])
local hold = tonumber(redis.call('GET', KEYS[1]) or '0')
if untl > hold then
  redis.call('SET', KEYS[1], tostring(untl), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return tostring(math.max(untl, hold) - now)
"""


class HostHeldOff(Exception):
    """The host asked us (Retry-After) to wait longer than we are willing to."""


@dataclass(frozen=True)
class DomainLimits:
    max_concurrency: int = 16      # requests in flight per host, fleet-wide; 0 = no limit
    max_rate: float = 20.0         # request starts per second per host, fleet-wide; 0 = no limit
    slot_ttl: float = 60.0         # a slot left by a killed worker frees itself after this
    max_hold_off: float = 120.0    # a Retry-After longer than this fails the sample instead


class DomainLimiter:
    def __init__(self, redis_client, limits: DomainLimits, prefix: str = PREFIX):
        self.redis = redis_client
        self.limits = limits
        self.prefix = prefix
        self._acquire = redis_client.register_script(_ACQUIRE)
        self._hold_off = redis_client.register_script(_HOLD_OFF)
        self.waited_s = 0.0  # total time callers spent waiting for a turn (for stats)
        self._lock = threading.Lock()
        # Finished requests' slots, released by the next acquire call of any thread of this
        # process in the same round trip (or by flush), so a request costs one round trip.
        self._releases: deque[tuple[str, str]] = deque()

    def _keys(self, host: str) -> list[str]:
        return [f"{self.prefix}:slots:{host}", f"{self.prefix}:next:{host}", f"{self.prefix}:hold:{host}"]

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        """Wait for this host's turn, hold one of its slots for the duration of the block."""
        token = self.acquire(host)
        try:
            yield
        finally:
            self.release(host, token)

    def try_acquire(self, host: str, token: str) -> tuple[bool, float]:
        """One atomic attempt: (True, start_in_s) with a slot taken, or (False, retry_in_s)."""
        lim = self.limits
        interval = 1.0 / lim.max_rate if lim.max_rate > 0 else 0.0
        releases = self._take_releases()
        granted, wait = self._acquire(keys=self._keys(host) + [key for key, _ in releases],
                                      args=[token, lim.max_concurrency, interval, lim.slot_ttl]
                                      + [tok for _, tok in releases])
        return bool(granted), max(0.0, float(wait))

    def _take_releases(self, most: int = 64) -> list[tuple[str, str]]:
        taken = []
        while len(taken) < most:
            try:
                taken.append(self._releases.popleft())
            except IndexError:
                break
        return taken

    def acquire(self, host: str) -> str:
        """Wait for a slot and for the reserved start time; returns the slot's token."""
        token = uuid.uuid4().hex
        waited = 0.0
        while True:
            granted, wait = self.try_acquire(host, token)
            if granted:
                break
            if wait > self.limits.max_hold_off:
                raise HostHeldOff(f"host {host} asked to wait {wait:.0f}s (Retry-After), "
                                  f"over {self.limits.max_hold_off:.0f}s")
            # Poll again a little after the hint, with jitter so waiters do not move in lockstep.
            pause = min(wait, 1.0) + random.uniform(0.0, 0.02)
            time.sleep(pause)
            waited += pause
        if wait > 0:
            time.sleep(wait)
            waited += wait
        if waited:
            with self._lock:
                self.waited_s += waited
        return token

    def release(self, host: str, token: str) -> None:
        """Give the slot back; it goes to Redis with the next acquire, or with flush()."""
        if self.limits.max_concurrency > 0:
            self._releases.append((self._keys(host)[0], token))

    def flush(self) -> None:
        """Send every pending release now (when a shard ends, and no acquire may follow soon)."""
        releases = self._take_releases(len(self._releases) + 1)
        if releases:
            with self.redis.pipeline(transaction=False) as pipe:
                for key, token in releases:
                    pipe.zrem(key, token)
                pipe.execute()

    def hold_off(self, host: str, seconds: float) -> float:
        """Ask every worker to leave `host` alone for `seconds` (Retry-After); returns the hold left."""
        return float(self._hold_off(keys=[self._keys(host)[2]], args=[seconds]))
