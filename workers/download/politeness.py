"""Fleet-wide politeness per host, decided by one Lua script in Redis that every worker shares.

Per host, in one atomic call, so two workers never both take the last slot:
- concurrency: a sorted set of request tokens scored by their expiry, so the slots of a
  worker killed mid-request free themselves after `slot_ttl` seconds;
- hold-off: a time before which nobody asks the host again (Retry-After on 429/503);
- pace: an adaptive interval between request starts, learnt from how the host answers.
  A host starts unpaced (only the concurrency cap applies). A congestion signal cuts its
  rate to a fraction of what it served just before (429/503: x0.7; timeouts and connection
  errors: x0.85; latency above twice its own baseline: x0.9; at most one cut per window, so
  a burst of refusals counts once). The rate then grows back along a cubic in time since the
  cut (TCP CUBIC's shape, scaled to the host's own rate): quickly back to where it was cut,
  carefully around it, faster and faster above it, and unpaced again once it is 8x past it.
  So a fast host is never slowed by a rule made for slow ones, and a host that says "too
  much" settles just under what it takes. `max_rate` is an explicit cap on top, off by default.
A caller reserves the next free start time and sleeps until it, at most `horizon` ahead (a
caller further back asks again later), so a hold-off set meanwhile still stops callers that
have not started. The slowest adaptive pace is 0.7 x MIN_RATE (a request every 3 s): a host
that only refuses is paused by its own Retry-After beyond that.
Times are Redis server time, so workers on machines with skewed clocks agree.

Each request reports how it went (outcome and latency) with the caller's next call, batched
per host; a refusal or an error is reported at once, since the fleet must slow down now.
Per-host state lives in one hash that expires `state_ttl` after its last use, so millions of
hosts cost bounded memory (ops/politeness.md measures it).

A slot freed by one thread of a process may be handed to the next thread of the same process
asking for the same unpaced host without a round trip, for up to `reuse_s` after Redis granted
it: it never left the slots set, so the fleet-wide count still holds, and the short reuse age
keeps its expiry valid and lets a cut or a hold-off set elsewhere take effect soon.
"""
from __future__ import annotations

import random
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

PREFIX = "clipfleet:polite"

# Outcomes a request reports.
OK, THROTTLED, ERROR, NONE = "ok", "throttled", "error", "none"

# KEYS: [1] slots zset, [2] host hash of the host asked for (both '' in report-only calls),
#       then per report: its slots zset and its host hash.
# ARGV: [1] token ('' = report only), [2] max concurrency (0 = none), [3] min interval s
#       (explicit cap, 0 = none), [4] slot ttl s, [5] state ttl s, [6] horizon s,
#       then per report: token to release ('' = none), ok count, summed latency s of the ok
#       ones, throttled count, error count, hold s (Retry-After; 0 = none).
# Returns {granted 0/1, wait s (start after it, or ask again after it), paced 0/1, hold left s}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state_ttl = tonumber(ARGV[5])
local K, UNPACED_X, TAU, LAT_FACTOR, LAT_MARGIN, MIN_RATE = 2.0, 8.0, 1.0, 2.0, 0.1, 0.5
local FIELDS = {'hold', 'next', 'rmax', 'beta', 'cut', 'srtt', 'base', 'okr', 'okt'}

local function load(key)
  local v = redis.call('HMGET', key, unpack(FIELDS))
  local h = {}
  for i, f in ipairs(FIELDS) do h[f] = tonumber(v[i]) end
  return h
end

-- The allowed rate now (starts/s), 0 when unpaced: a cubic through beta*rmax at the cut,
-- flat at rmax after K seconds, growing above it after that.
local function rate(h)
  if not h.rmax or h.rmax <= 0 then return 0 end
  local x = (now - h.cut) / K - 1
  local r = h.rmax * (1 + (1 - h.beta) * x * x * x)
  if r >= UNPACED_X * h.rmax then return 0 end
  return math.max(r, h.rmax * h.beta * 0.5)
end

local function served(h)  -- successes per second lately (exponentially decayed, TAU s)
  if not h.okr then return 0 end
  return h.okr * math.exp(-(now - h.okt) / TAU)
end

local function report(slots, key, token, nok, latsum, nthr, nerr, hold_s)
  if token ~= '' then redis.call('ZREM', slots, token) end
  if nok + nthr + nerr == 0 and hold_s <= 0 then return end
  local h = load(key)
  local set = {}
  if nok > 0 then
    local lat = latsum / nok
    h.srtt = h.srtt and (0.8 * h.srtt + 0.2 * lat) or lat
    -- The baseline follows the smoothed latency down at once and up only slowly, so a host
    -- that gets slower under our load shows as latency above its own baseline.
    h.base = h.base and math.min(h.srtt, h.base + (h.srtt - h.base) * 0.01) or h.srtt
    h.okr = served(h) + nok / TAU
    h.okt = now
    for _, f in ipairs({'srtt', 'base', 'okr', 'okt'}) do table.insert(set, f); table.insert(set, h[f]) end
  end
  local beta = nil
  if nthr > 0 then beta = 0.7
  elseif nerr > 0 then beta = 0.85
  elseif nok > 0 and h.srtt > LAT_FACTOR * h.base + LAT_MARGIN then beta = 0.9 end
  if beta and now - (h.cut or 0) > math.max(1.0, 3 * (h.srtt or 0)) then
    local r, s = rate(h), served(h)
    -- What the host served lately is what it takes; never below MIN_RATE, so a host that
    -- only refuses is asked again at a slow pace (its Retry-After pauses it beyond that).
    local top = math.max(s, MIN_RATE)
    if r > 0 and r < top then top = math.max(r, MIN_RATE) end
    for _, kv in ipairs({{'rmax', top}, {'beta', beta}, {'cut', now}}) do
      table.insert(set, kv[1]); table.insert(set, kv[2])
    end
  end
  local hold = h.hold or 0
  if hold_s > 0 and now + hold_s > hold then
    hold = now + hold_s
    table.insert(set, 'hold'); table.insert(set, hold)
  end
  if #set > 0 then redis.call('HSET', key, unpack(set)) end
  redis.call('PEXPIRE', key, math.ceil(math.max(state_ttl, hold - now + 1) * 1000))
  return hold - now
end

local hold_left = 0
local n = (#ARGV - 6) / 6
for i = 0, n - 1 do
  local a = 7 + 6 * i
  local left = report(KEYS[3 + 2 * i], KEYS[4 + 2 * i], ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
                      tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]))
  if left and left > hold_left then hold_left = left end
end

local token = ARGV[1]
if token == '' then return {0, '0', 0, tostring(hold_left)} end
local limit, min_iv, ttl, horizon = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local h = load(KEYS[2])
if h.hold and h.hold > now then return {0, tostring(h.hold - now), 1, tostring(h.hold - now)} end
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= limit then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, tostring(math.min(0.05, tonumber(first[2]) - now)), 0, '0'}
  end
end
local r = rate(h)
local iv = 0
if r > 0 then iv = 1 / r end
if min_iv > iv then iv = min_iv end
local start = now
if iv > 0 then
  start = math.max(now, h.next or 0)
  -- Not far ahead: a caller sleeping on a reservation cannot be stopped by a hold-off.
  if start - now > horizon then return {0, tostring(start - now - horizon), 1, '0'} end
  redis.call('HSET', KEYS[2], 'next', start + iv)
  redis.call('PEXPIRE', KEYS[2], math.ceil(state_ttl * 1000))
end
if limit > 0 then
  redis.call('ZADD', KEYS[1], start + ttl, token)
  redis.call('PEXPIRE', KEYS[1], math.ceil((start - now + ttl) * 1000) + 60000)
end
local paced = 0
if iv > 0 then paced = 1 end
return {1, tostring(start - now), paced, '0'}
"""


class HostHeldOff(Exception):
    """The host asked us (Retry-After) to wait longer than we are willing to."""


@dataclass(frozen=True)
class DomainLimits:
    max_concurrency: int = 16      # requests in flight per host, fleet-wide; 0 = no limit
    max_rate: float = 0.0          # explicit cap on request starts per second per host; 0 = none
    slot_ttl: float = 60.0         # a slot left by a killed worker frees itself after this
    max_hold_off: float = 120.0    # a Retry-After longer than this fails the sample instead
    reuse_s: float = 1.0           # a freed slot granted less than this ago is reused locally
    state_ttl: float = 600.0       # a host's learnt pace is forgotten this long after its last use
    horizon: float = 0.05          # a start is reserved at most this far ahead


class _Report:
    """What a process has to tell Redis about one host's finished requests."""
    __slots__ = ("tokens", "ok", "latency", "throttled", "errors", "hold")

    def __init__(self):
        self.tokens: list[str] = []
        self.ok = self.throttled = self.errors = 0
        self.latency = self.hold = 0.0


class DomainLimiter:
    def __init__(self, redis_client, limits: DomainLimits, prefix: str = PREFIX):
        self.redis = redis_client
        self.limits = limits
        self.prefix = prefix
        self._script = redis_client.register_script(_SCRIPT)
        self.waited_s = 0.0  # total time callers spent waiting for a turn (for stats)
        self._lock = threading.Lock()
        # Finished requests, per host, sent with the next call of any thread of this process
        # (or by flush), so a request costs one round trip.
        self._reports: dict[str, _Report] = {}
        # Freed slots kept for local reuse: host -> [(token, monotonic time Redis granted it)].
        self._free: dict[str, list[tuple[str, float]]] = {}
        self._granted_at: dict[str, float] = {}  # token -> monotonic grant time, while held
        self._held_until: dict[str, float] = {}  # host -> monotonic end of a hold-off seen here
        self._paced: set[str] = set()  # hosts Redis last granted with a pace: no local reuse
        # One waiting thread per process asks Redis for a busy host; the others queue here
        # instead of polling too (128 threads polling one host would be thousands of calls/s).
        self._gates: dict[str, threading.Lock] = {}

    def _keys(self, host: str) -> list[str]:
        return [f"{self.prefix}:slots:{host}", f"{self.prefix}:host:{host}"]

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        """Wait for this host's turn, hold one of its slots for the duration of the block."""
        token = self.acquire(host)
        try:
            yield
        finally:
            self.release(host, token)

    def _call(self, host: str | None, token: str, reports: dict[str, _Report],
              min_interval: float = 0.0) -> tuple[bool, float, bool, float]:
        lim = self.limits
        keys = self._keys(host) if host is not None else ["", ""]
        args = [token, lim.max_concurrency, max(1.0 / lim.max_rate if lim.max_rate > 0 else 0.0, min_interval),
                lim.slot_ttl, lim.state_ttl, lim.horizon]
        for h, rep in reports.items():
            keys += self._keys(h)
            for tok in rep.tokens[1:]:  # one token per report entry; the rest ride on empty entries
                keys += self._keys(h)
                args += [tok, 0, 0, 0, 0, 0]
            args += [rep.tokens[0] if rep.tokens else "", rep.ok, round(rep.latency, 6), rep.throttled,
                     rep.errors, rep.hold]
        try:
            granted, wait, paced, hold = self._script(keys=keys, args=args)
        except Exception:
            with self._lock:  # not lost: they go with the next call
                for h, rep in reports.items():
                    self._merge(h, rep)
            raise
        return bool(granted), max(0.0, float(wait)), bool(paced), float(hold)

    def _merge(self, host: str, rep: _Report) -> None:
        mine = self._reports.setdefault(host, _Report())
        mine.tokens += rep.tokens
        mine.ok += rep.ok
        mine.latency += rep.latency
        mine.throttled += rep.throttled
        mine.errors += rep.errors
        mine.hold = max(mine.hold, rep.hold)

    def _take_reports(self) -> dict[str, _Report]:
        with self._lock:
            reports, self._reports = self._reports, {}
        return reports

    def try_acquire(self, host: str, token: str, min_interval: float = 0.0) -> tuple[bool, float]:
        """One atomic attempt: (True, start_in_s) with a slot taken, or (False, retry_in_s).

        `min_interval`: seconds between this host's request starts at the least (its robots.txt
        Crawl-delay), on top of the adaptive pace and --domain-max-rate."""
        self._unfree()
        granted, wait, paced, _ = self._call(host, token, self._take_reports(), min_interval)
        with self._lock:
            (self._paced.add if paced else self._paced.discard)(host)
        return granted, wait

    def _reusable(self, host: str) -> bool:
        lim = self.limits
        return lim.max_concurrency > 0 and lim.max_rate <= 0 and lim.reuse_s > 0 and host not in self._paced

    def _unfree(self, host: str | None = None) -> None:
        """Queue freed slots (of one host, or all) for release to Redis with the next round trip."""
        with self._lock:
            hosts = list(self._free) if host is None else [host]
            for h in hosts:
                tokens = [token for token, _ in self._free.pop(h, ())]
                for token in tokens:
                    self._granted_at.pop(token, None)
                if tokens:
                    self._reports.setdefault(h, _Report()).tokens.extend(tokens)

    def _reuse(self, host: str) -> str | None:
        """A freed slot of `host` still young enough to hand out again, or None."""
        with self._lock:
            if self._held_until.get(host, 0.0) > time.monotonic() or host in self._paced:
                return None  # held off or paced: ask Redis, which knows for how long
            free = self._free.get(host)
            while free:
                token, granted = free.pop()
                if time.monotonic() - granted < self.limits.reuse_s:
                    self._granted_at[token] = granted
                    return token
                self._reports.setdefault(host, _Report()).tokens.append(token)  # too old: back to Redis
        return None

    def acquire(self, host: str, min_interval: float = 0.0) -> str:
        """Wait for a slot and for the reserved start time; returns the slot's token."""
        if self._reusable(host) and min_interval <= 0:
            token = self._reuse(host)
            if token is not None:
                return token
        token = uuid.uuid4().hex
        started = time.monotonic()
        granted, wait = self.try_acquire(host, token, min_interval)
        if not granted:
            self._check_hold(host, wait)
            with self._lock:
                gate = self._gates.setdefault(host, threading.Lock())
            with gate:
                granted, wait = self.try_acquire(host, token, min_interval)  # things changed while queued
                while not granted:
                    self._check_hold(host, wait)
                    # Ask again a little after the hint, with jitter so workers do not move in lockstep.
                    time.sleep(min(wait, 1.0) + random.uniform(0.0, 0.005))
                    granted, wait = self.try_acquire(host, token, min_interval)
        if wait > 0:
            time.sleep(wait)
        with self._lock:
            self.waited_s += time.monotonic() - started
            if self._reusable(host) and min_interval <= 0:
                self._granted_at[token] = time.monotonic()
        return token

    def _check_hold(self, host: str, wait: float) -> None:
        if wait > self.limits.max_hold_off:
            raise HostHeldOff(f"host {host} asked to wait {wait:.0f}s (Retry-After), "
                              f"over {self.limits.max_hold_off:.0f}s")

    def release(self, host: str, token: str, outcome: str = NONE, latency: float = 0.0,
                retry_after: float | None = None) -> None:
        """Give the slot back and say how the request went: OK (with its latency), THROTTLED
        (429/503, with the Retry-After), ERROR (timeout, connection error) or NONE.

        An OK goes to Redis with the next call; a refusal or an error is told at once."""
        with self._lock:
            rep = self._reports.setdefault(host, _Report())
            if outcome == OK:
                rep.ok += 1
                rep.latency += latency
            elif outcome == THROTTLED:
                rep.throttled += 1
                rep.hold = max(rep.hold, retry_after or 0.0)
            elif outcome == ERROR:
                rep.errors += 1
            granted = self._granted_at.pop(token, None) if self.limits.max_concurrency > 0 else None
            if self.limits.max_concurrency > 0:
                if granted is not None and outcome in (OK, NONE):
                    self._free.setdefault(host, []).append((token, granted))
                else:
                    rep.tokens.append(token)
        if outcome in (THROTTLED, ERROR):
            left = self._report_now()
            if outcome == THROTTLED and retry_after:
                self._note_hold(host, left)

    def _report_now(self) -> float:
        self._unfree()
        reports = self._take_reports()
        return self._call(None, "", reports)[3] if reports else 0.0

    def _note_hold(self, host: str, left: float) -> None:
        with self._lock:  # no local reuse past a hold-off
            self._held_until[host] = time.monotonic() + left
        self._unfree(host)

    def flush(self) -> None:
        """Send every pending report and release now (when a shard ends, and no call may follow soon)."""
        self._report_now()
        with self._lock:  # a shard's hosts rarely come back in the next one
            self._gates = {h: g for h, g in self._gates.items() if g.locked()}
            now = time.monotonic()
            self._held_until = {h: t for h, t in self._held_until.items() if t > now}
            self._paced.clear()

    def hold_off(self, host: str, seconds: float) -> float:
        """Ask every worker to leave `host` alone for `seconds` (Retry-After); returns the hold left.

        Counts as a refusal from the host, so its pace is cut too."""
        with self._lock:
            rep = self._reports.setdefault(host, _Report())
            rep.throttled += 1
            rep.hold = max(rep.hold, seconds)
        left = self._report_now()
        self._note_hold(host, left)
        return left

    def state(self, host: str) -> dict[str, float]:
        """The host's learnt state as Redis holds it (for tests, `status` and operators)."""
        raw = self.redis.hgetall(self._keys(host)[1])
        return {k.decode(): float(v) for k, v in raw.items()}
