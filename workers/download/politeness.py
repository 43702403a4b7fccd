"""Fleet-wide politeness per domain, shared through Redis by every download worker.

Three limits per host, checked and taken in one Lua script so that two workers never both
take the last slot:
- concurrency: a sorted set of request tokens scored by their expiry, so the slots of a
  worker killed mid-request free themselves after `slot_ttl` seconds;
- rate: the next time a request may start; a caller reserves the next free start time and
  sleeps until it, so waiting callers are served in turn rather than by polling races;
- hold-off: a time before which nobody asks the host again, set from Retry-After.
Times are Redis server time, so workers on machines with skewed clocks agree.

With no rate limit, a slot freed by one thread may be handed to the next thread of the same
process asking for the same host without a round trip, for up to `reuse_s` after Redis granted
it: it never left the slots set, so the fleet-wide count still holds, and the short reuse age
keeps its expiry valid and lets other workers (and a hold-off set elsewhere) in soon.
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
    reuse_s: float = 1.0           # a freed slot granted less than this ago is reused locally


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
        # Freed slots kept for local reuse: host -> [(token, monotonic time Redis granted it)].
        self._free: dict[str, list[tuple[str, float]]] = {}
        self._granted_at: dict[str, float] = {}  # token -> monotonic grant time, while held
        self._held_until: dict[str, float] = {}  # host -> monotonic end of a hold-off set here

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
        self._unfree()
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

    def _reusable(self) -> bool:
        lim = self.limits
        return lim.max_concurrency > 0 and lim.max_rate <= 0 and lim.reuse_s > 0

    def _unfree(self, host: str | None = None) -> None:
        """Queue freed slots (of one host, or all) for release to Redis with the next round trip."""
        with self._lock:
            hosts = list(self._free) if host is None else [host]
            for h in hosts:
                key = self._keys(h)[0]
                for token, _ in self._free.pop(h, ()):
                    self._granted_at.pop(token, None)
                    self._releases.append((key, token))

    def _reuse(self, host: str) -> str | None:
        """A freed slot of `host` still young enough to hand out again, or None."""
        with self._lock:
            if self._held_until.get(host, 0.0) > time.monotonic():
                return None  # held off: ask Redis, which knows for how long
            free = self._free.get(host)
            while free:
                token, granted = free.pop()
                if time.monotonic() - granted < self.limits.reuse_s:
                    self._granted_at[token] = granted
                    return token
                self._releases.append((self._keys(host)[0], token))  # too old: back to Redis
        return None

    def acquire(self, host: str) -> str:
        """Wait for a slot and for the reserved start time; returns the slot's token."""
        if self._reusable():
            token = self._reuse(host)
            if token is not None:
                return token
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
        with self._lock:
            self.waited_s += waited
            if self._reusable():
                self._granted_at[token] = time.monotonic()
        return token

    def release(self, host: str, token: str) -> None:
        """Give the slot back; it goes to Redis with the next acquire, or with flush()."""
        if self.limits.max_concurrency > 0:
            with self._lock:
                granted = self._granted_at.pop(token, None)
                if granted is not None:
                    self._free.setdefault(host, []).append((token, granted))
                    return
            self._releases.append((self._keys(host)[0], token))

    def flush(self) -> None:
        """Send every pending release now (when a shard ends, and no acquire may follow soon)."""
        self._unfree()
        releases = self._take_releases(len(self._releases) + 1)
        if releases:
            with self.redis.pipeline(transaction=False) as pipe:
                for key, token in releases:
                    pipe.zrem(key, token)
                pipe.execute()

    def hold_off(self, host: str, seconds: float) -> float:
        """Ask every worker to leave `host` alone for `seconds` (Retry-After); returns the hold left."""
        left = float(self._hold_off(keys=[self._keys(host)[2]], args=[seconds]))
        with self._lock:  # no local reuse past a hold-off
            self._held_until[host] = time.monotonic() + left
        self._unfree(host)
        return left
