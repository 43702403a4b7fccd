"""robots.txt (RFC 9309), fetched once per host for the whole fleet and obeyed before any request.

- Fetched through the Fetcher itself: the same address guard, deadline and politeness slot,
  redirects followed (up to five), the body cut at 500 KiB (RFC 9309 2.5), parsed by Protego
  (Scrapy's parser: wildcards, `$`, longest match wins, allow wins ties).
- The groups obeyed: clipfleet's (the user agent's product token), the first word of
  --user-agent-token when it is a token, and every --robots-also token (CCBot: the URLs came
  from its crawl, and an operator who shut CCBot out may not know our name); each falls back
  to `*` when the file has no group for it. A URL is disallowed when any of them disallows it.
- Crawl-delay and Request-rate of those groups set the least time between request starts to the
  host, fleet-wide (up to MAX_CRAWL_DELAY_S), on top of the adaptive pace.
- 2xx: the rules; 4xx: no rules (everything allowed, RFC 9309 2.3.1.3); 5xx, 429, a timeout or
  a connection failure: unreachable, so everything is disallowed for a while (2.3.1.4) and
  asked again after ERROR_TTL_S.
- Cached fleet-wide in Redis (zlib-compressed text, TTL_S, RFC 9309 asks for at most 24 h) and
  parsed per process in a bounded LRU. One worker fetches a host's robots.txt while the others
  wait for its answer (a Redis lock with an expiry, so a worker dying mid-fetch blocks no one).
- The same file's usage preferences (aipref Content-Usage, Content-Signal) are read from the
  cached text (robots_prefs.py). The caching is SiteFileCache's, which TDMRep's
  /.well-known/tdmrep.json shares (tdmrep.py): one mechanism for every site-wide file.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import zlib
from collections import OrderedDict

from protego import Protego

from clipfleet.workers.download import tdmrep
from clipfleet.workers.download.consent import parse_respect
from clipfleet.workers.download.fetch import PRODUCT, FetchFailed
from clipfleet.workers.download.options import DownloadOptions
from clipfleet.workers.download.robots_prefs import RobotsPrefs

log = logging.getLogger("clipfleet.download")

PREFIX = "clipfleet:robots"
TDMREP_PREFIX = "clipfleet:tdmrep"
TTL_S = 24 * 3600
ERROR_TTL_S = 600.0
LOCAL_ENTRIES = 20_000  # parsed files kept per process ...
LOCAL_BYTES = 64 * 2**20  # ... and at most this much robots.txt text behind them (a file can be 500 KiB)
LOCAL_TTL_S = 3600.0    # a process asks Redis again after this, so a re-fetch reaches everyone
# Crawl-delay / Request-rate are not in RFC 9309, but polite crawlers (Bing, Yandex) honour
# them. Past this many seconds a shard of one host's URLs would outlive the task's time limit,
# so a longer delay is honoured as this one.
MAX_CRAWL_DELAY_S = 10.0
TOKEN = re.compile(r"[a-z_-]+")  # what RFC 9309 allows in a product token


class _AllowAll:
    """No rules (4xx, or an empty file)."""
    def refusal(self, url: str, tokens: list[str] | None = None) -> str | None:
        return None

    def usage_refusal(self, url: str, tokens: list[str], purpose: str, usage: bool, signal: bool):
        return None

    def interval(self, tokens: list[str]) -> float:
        return 0.0


class _DisallowAll:
    """robots.txt unreachable: nothing may be fetched until it is asked again."""
    def __init__(self, why: str):
        self.why = why

    def refusal(self, url: str, tokens: list[str] | None = None) -> str | None:
        return f"unreachable ({self.why}): every URL of the host disallowed for now (RFC 9309)"

    def usage_refusal(self, url: str, tokens: list[str], purpose: str, usage: bool, signal: bool):
        return None  # refusal() already holds every URL back

    def interval(self, tokens: list[str]) -> float:
        return 0.0


class _Rules:
    def __init__(self, text: str):
        self.parsed = Protego.parse(text)
        self.prefs = RobotsPrefs(text) if "content-" in text.lower() else None
        self.size = len(text)
        self._intervals: dict[tuple, float] = {}

    def refusal(self, url: str, tokens: list[str]) -> str | None:
        for token in tokens:
            if not self.parsed.can_fetch(url, token):
                return f"disallowed by robots.txt (for {token})"
        return None

    def usage_refusal(self, url: str, tokens: list[str], purpose: str, usage: bool, signal: bool):
        """(kind, message) when a Content-Usage or Content-Signal rule of our groups says no."""
        return self.prefs.refusal(url, tokens, purpose, usage, signal) if self.prefs else None

    def interval(self, tokens: list[str]) -> float:
        """Seconds between requests the groups ask for (Crawl-delay, Request-rate), capped."""
        key = tuple(tokens)
        if key not in self._intervals:
            asked = 0.0
            for token in tokens:
                delay = self.parsed.crawl_delay(token)
                rate = self.parsed.request_rate(token)
                if delay:
                    asked = max(asked, float(delay))
                if rate and rate.requests:
                    asked = max(asked, rate.seconds / rate.requests)
            self._intervals[key] = min(asked, MAX_CRAWL_DELAY_S)
        return self._intervals[key]


def _parse(text: str):
    """The rules of a robots.txt; a file Protego cannot take is read as having none (RFC 9309
    ignores what it cannot parse), so a parser failure never costs a whole host's images."""
    try:
        return _Rules(text)
    except Exception:  # noqa: BLE001 (a third-party parser on text from the web)
        log.warning("robots.txt could not be parsed; read as no rules", exc_info=True)
        return _AllowAll()


def _decode(payload: bytes, parse=_parse):
    kind, rest = payload[:1], payload[1:]
    if kind == b"A":
        return _AllowAll()
    if kind == b"D":
        return _DisallowAll(rest.decode("utf-8", "replace"))
    return parse(zlib.decompress(rest).decode("utf-8", "replace"))


def obeyed_tokens(opts: DownloadOptions) -> list[str]:
    tokens = [PRODUCT]
    if opts.user_agent_token:
        first = opts.user_agent_token.strip().split()[0].strip(";,").lower() if opts.user_agent_token.strip() else ""
        if TOKEN.fullmatch(first) and first not in tokens:
            tokens.append(first)
    return tokens + [t for t in opts.robots_also if t not in tokens]


class SiteFileCache:
    """One site-wide file per host (robots.txt, tdmrep.json): fetched once for the fleet, cached in
    Redis for `ttl_s` (`error_ttl_s` after a failure) and parsed per process in a bounded LRU."""
    path = "/robots.txt"
    name = "robots.txt"

    def __init__(self, fetcher, redis_client, opts: DownloadOptions, prefix: str = PREFIX,
                 ttl_s: float = TTL_S, error_ttl_s: float = ERROR_TTL_S):
        self.fetcher = fetcher
        self.redis = redis_client  # None: a process-local cache only (a Fetcher used on its own)
        self.tokens = obeyed_tokens(opts)
        self.prefix = prefix
        self.ttl_s, self.error_ttl_s = ttl_s, error_ttl_s
        self.wait_s = opts.download_timeout + 5  # for another worker's fetch, then we fetch ourselves
        self._local: OrderedDict[str, tuple[float, object, int]] = OrderedDict()  # expiry, rules, size
        self._local_bytes = 0
        self._lock = threading.Lock()
        self._authority_locks: dict[str, threading.Lock] = {}

    def parse(self, text: str):
        return _parse(text)

    def rules(self, scheme: str, host: str, port: int):
        authority = f"{scheme}://{host}:{port}"
        found = self._cached(authority)
        if found is not None:
            return found
        with self._lock:
            lock = self._authority_locks.setdefault(authority, threading.Lock())
        with lock:  # one thread of this process asks; the others find its answer cached
            found = self._cached(authority)
            if found is None:
                found, ttl = self._shared(authority, scheme, host, port)
                with self._lock:
                    size = getattr(found, "size", 0)
                    self._local[authority] = (time.monotonic() + min(ttl, LOCAL_TTL_S), found, size)
                    self._local_bytes += size
                    while len(self._local) > LOCAL_ENTRIES or self._local_bytes > LOCAL_BYTES:
                        self._local_bytes -= self._local.popitem(last=False)[1][2]
        with self._lock:
            if len(self._authority_locks) > LOCAL_ENTRIES:
                self._authority_locks = {a: l for a, l in self._authority_locks.items() if l.locked()}
        return found

    def _cached(self, authority: str):
        with self._lock:
            entry = self._local.get(authority)
            if entry is None:
                return None
            if entry[0] <= time.monotonic():
                self._local_bytes -= self._local.pop(authority)[2]
                return None
            self._local.move_to_end(authority)
            return entry[1]

    def _shared(self, authority: str, scheme: str, host: str, port: int):
        """From Redis, or fetched by this worker (holding the fleet's lock for this host)."""
        if self.redis is None:
            rules, _, ttl = self._fetch(scheme, host, port)
            return rules, ttl
        key, lock_key = f"{self.prefix}:{authority}", f"{self.prefix}:lock:{authority}"
        give_up = time.monotonic() + self.wait_s
        while True:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                payload, ttl_ms = pipe.execute()
            if payload is not None:
                return _decode(payload, self.parse), max(1.0, ttl_ms / 1000)
            if time.monotonic() > give_up or self.redis.set(lock_key, b"1", nx=True, px=int(self.wait_s * 1000)):
                break
            time.sleep(0.05)  # another worker is fetching it
        try:
            rules, payload, ttl = self._fetch(scheme, host, port)
            self.redis.set(key, payload, px=int(ttl * 1000))
        finally:
            self.redis.delete(lock_key)
        return rules, ttl

    def _fetch(self, scheme: str, host: str, port: int):
        """(rules, payload for Redis, ttl s) from one request for the host's file."""
        default = 443 if scheme == "https" else 80
        netloc = (f"[{host}]" if ":" in host else host) + ("" if port == default else f":{port}")
        started = time.monotonic()
        try:
            answer = self.fetcher.fetch_robots(f"{scheme}://{netloc}{self.path}")
        except FetchFailed as exc:
            why = str(exc)[:200]
            return _DisallowAll(why), b"D" + why.encode(), self.error_ttl_s
        finally:
            counted = "robots" if self.path == "/robots.txt" else "tdmrep"
            self.fetcher.count(f"{counted}_fetches")
            self.fetcher.count(f"{counted}_seconds", time.monotonic() - started)
        if 200 <= answer.status < 300:
            text = answer.body.decode("utf-8", "replace")
            return self.parse(text), b"R" + zlib.compress(text.encode("utf-8"), 6), self.ttl_s
        if 400 <= answer.status < 500:
            return _AllowAll(), b"A", self.ttl_s
        why = f"http {answer.status}"
        return _DisallowAll(why), b"D" + why.encode(), self.error_ttl_s


class RobotsRules(SiteFileCache):
    """robots.txt: Allow/Disallow and Crawl-delay (when robots.txt is honoured), and the
    Content-Usage / Content-Signal rules of its groups (when those are)."""

    def __init__(self, fetcher, redis_client, opts: DownloadOptions, prefix: str = PREFIX,
                 ttl_s: float = TTL_S, error_ttl_s: float = ERROR_TTL_S):
        super().__init__(fetcher, redis_client, opts, prefix, ttl_s, error_ttl_s)
        honoured, self.purpose = parse_respect(opts.respect)
        self.obey_rules = "robots.txt" in honoured and not opts.ignore_robots_txt
        self.usage, self.signal = "content-usage" in honoured, "content-signal" in honoured

    def check(self, scheme: str, host: str, port: int, url: str) -> float:
        """Raise FetchFailed (refused "robots.txt", "robots.txt unreachable" or a usage preference's
        kind) unless `url` may be fetched; else the seconds the host asks between requests
        (Crawl-delay), 0 for none."""
        rules = self.rules(scheme, host, port)
        why = rules.refusal(url, self.tokens)
        if why and (self.obey_rules or isinstance(rules, _DisallowAll)):
            self.fetcher.count("robots_refusals")
            if isinstance(rules, _DisallowAll):
                raise FetchFailed(f"robots.txt {why}", refused="robots.txt unreachable")
            raise FetchFailed(why, refused="robots.txt")
        said = rules.usage_refusal(url, self.tokens, self.purpose, self.usage, self.signal)
        if said:
            raise FetchFailed(said[1], refused=said[0])
        return rules.interval(self.tokens) if self.obey_rules else 0.0


class TdmRepRules(SiteFileCache):
    """TDMRep's /.well-known/tdmrep.json (tdmrep.py)."""
    path = tdmrep.PATH
    name = "tdmrep.json"

    def __init__(self, fetcher, redis_client, opts: DownloadOptions, prefix: str = TDMREP_PREFIX, **kwargs):
        super().__init__(fetcher, redis_client, opts, prefix, **kwargs)

    def parse(self, text: str):
        return tdmrep.parse(text)

    def check(self, scheme: str, host: str, port: int, url: str) -> None:
        rules = self.rules(scheme, host, port)
        if isinstance(rules, _DisallowAll):
            raise FetchFailed(f"tdmrep.json {rules.refusal(url)}", refused="tdmrep.json unreachable")
        said = rules.refusal(url)
        if said:
            raise FetchFailed(said[1], refused=said[0])
