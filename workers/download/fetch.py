"""Fetch one image over HTTP(S): guarded, bounded and polite.

- Every hop (the URL and each redirect) is resolved and checked by address_guard before any
  connection, and the connection goes to the checked address. Redirects are followed here,
  a bounded number of times, with loop detection.
- One deadline covers the whole network time of an image (connect, TLS, headers, body,
  retries): every read waits only for the time left (workers/http1.py), so a server that
  drips one byte a second cannot hold a thread past it. Waiting for a polite turn does not
  count against it.
- A byte limit is checked on Content-Length and again while reading.
- Each request takes a per-host slot from the fleet-wide DomainLimiter and tells it how the
  host answered (latency, refusal, error), which is what paces the host (politeness.py).
- A 429 or 503 pauses the host for its Retry-After across the fleet; the image is asked again
  after the pause as long as its deadline allows (the pause is charged to it), without using
  up its retries. Other transient failures get `download_retries` more attempts.
- robots.txt is checked for every hop before it is requested (robots.py); the robots.txt
  itself is fetched through this same guard, deadline and size limit.
- X-Robots-Tag noai / noimageai (for everyone or for our token), `Content-Usage: train-ai=n` and
  `tdm-reservation: 1` mean the image is not used (consent.py): checked when the headers arrive,
  so the body of an opted-out image is never read. TDMRep's tdmrep.json is checked for every hop
  as robots.txt is (robots.py, tdmrep.py).
- Each thread keeps a few connections alive after a complete response, reused only for an
  address the guard passes again for the next request.
"""
from __future__ import annotations

import functools
import random
import re
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

from clipfleet.shared import __version__
from clipfleet.workers.download import http1
from clipfleet.workers.download.consent import HeaderRules
from clipfleet.workers.download.options import DownloadOptions
from clipfleet.workers.download.guard import AddressRefused, Resolver, checked_addresses
from clipfleet.workers.download.politeness import ERROR, NONE, OK, THROTTLED, HostHeldOff

REDIRECT_CODES = {301, 302, 303, 307, 308}
# Worth asking again later: overload, gateway trouble, rate limiting, request timeout.
TRANSIENT_CODES = {408, 425, 429, 500, 502, 503, 504}
# The host says it is over capacity: pause it fleet-wide, slow it, ask again after the pause.
THROTTLE_CODES = {429, 503}
DEFAULT_HOLD_S = 1.0  # a 429/503 without a Retry-After still pauses the host this long
MAX_THROTTLED_ATTEMPTS = 30  # with pauses of at least DEFAULT_HOLD_S, beyond any sane deadline anyway
# RFC 9309 2.5: a crawler parses at least the first 500 KiB of a robots.txt; the rest is cut.
ROBOTS_MAX_BYTES = 500 * 1024
PRODUCT = "clipfleet"
# Refusals made on a 200's headers: the host answered well, its pace counts it as a success.
HEADER_KINDS = {"x-robots-tag", "content-usage header", "tdmrep header"}
ROBOTS_CONVENTIONS = {"robots.txt", "content-usage", "content-signal"}  # read from robots.txt
IDLE_PER_THREAD = 4  # kept-alive connections per fetching thread
# A host's checked addresses are reused this long: image hosts repeat within a shard, and a
# lookup per image would cost a DNS round trip each (DNS answers commonly live 60-300 s).
# Safe against rebinding: we still connect only to the addresses that were checked.
ADDRESS_CACHE_S = 60.0
ADDRESS_CACHE_SIZE = 100_000
# Characters left as they are in a request target; others (non-ASCII, spaces) are %-encoded,
# as browsers do, since URLs from the web are often not ASCII.
TARGET_SAFE = "/?&=:;@!$'()*+,%[]~"
# A host name after IDNA, or an IP literal (IPv6 with its zone id).
HOST_CHARS = re.compile(r"[a-z0-9._:%-]+")

Connector = Callable[[tuple[str, int], float], socket.socket]


class FetchFailed(Exception):
    """Final outcome for a URL that gave no image. `refused` names a deliberate refusal;
    `host_trouble` marks a timeout or refused connection, which slows the host's pace."""

    def __init__(self, message: str, refused: str | None = None, host_trouble: bool = False):
        super().__init__(message)
        self.refused = refused
        self.host_trouble = host_trouble
        self.latency: float | None = None  # set when the host did answer, in this many seconds


class _StaleConnection(Exception):
    """A kept-alive connection the server had closed; the request is sent again on a new one."""


class _IdleConnections(threading.local):
    """Per thread: (scheme, host, port) -> (address, connection) kept alive after a 200."""

    def __init__(self):
        self.conns: dict = {}


class _Transient(Exception):
    """A failure worth another attempt; `retry_after` is the server's own request, if any."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Throttled(_Transient):
    """429 or 503: the host is over capacity; `retry_after` is how long it asked us to pause."""


@dataclass(frozen=True)
class RobotsAnswer:
    """The final response to a robots.txt request: its status, and its body on a 200."""
    status: int
    body: bytes
    truncated: bool = False


def user_agent(token: str | None, robots_txt: bool = True, contact: str | None = None) -> str:
    """Says who we are, how to tell us no and (--contact) how to reach the operator; the token
    lets operators name their crawl.

    `clipfleet` is the product token a robots.txt group names (User-agent: clipfleet)."""
    for what, value in (("token", token), ("contact", contact)):
        if value is not None and (not value.isprintable() or not value.isascii()):
            raise ValueError(f"the user agent {what} must be printable ASCII, got {value!r}")
    honours = ("robots.txt, Content-Usage, TDMRep and X-Robots-Tag noai" if robots_txt
               else "Content-Usage, TDMRep and X-Robots-Tag noai")
    ua = f"Mozilla/5.0 (compatible; {PRODUCT}/{__version__}; image-text dataset downloader; honours {honours}"
    ua += f"; +{contact}" if contact else ""
    return f"{ua}; {token})" if token else f"{ua})"


def robots_refusal(values: list[str], tokens: set[str], disallowed: set[str]) -> str | None:
    """The X-Robots-Tag directive that forbids using this image, if any.

    Each value is either `directives` (for every agent) or `agent: directives`."""
    for value in values:
        agent, sep, directives = value.partition(":")
        if not sep:
            agent, directives = "", value
        agent = agent.strip().lower()
        if agent and agent not in tokens:
            continue
        for directive in directives.split(","):
            if directive.strip().lower() in disallowed:
                return directive.strip().lower()
    return None


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def ascii_host(hostname: str) -> str:
    """The host as DNS and the Host header need it: lower case, IDNA for non-ASCII names."""
    host = hostname.lower()
    return host if host.isascii() else host.encode("idna").decode("ascii")


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    """One verifying context per process: building one loads the CA store (milliseconds)."""
    return ssl.create_default_context()


class Budget:
    """The network time left for one image."""

    def __init__(self, seconds: float):
        self.total = seconds
        self.spent = 0.0

    def left(self) -> float:
        return self.total - self.spent

    def timeout_message(self) -> str:
        return f"timeout: no complete response within {self.total:g}s"


class Fetcher:
    max_redirects = 5  # RFC 9309 asks for at least five for robots.txt; images get the same
    retry_backoff = 0.5  # first backoff in seconds; doubles per attempt

    def __init__(self, opts: DownloadOptions, limiter=None, resolver: Resolver = socket.getaddrinfo,
                 connect: Connector = socket.create_connection,
                 url_blocked: Callable[[str], bool | str] = lambda url: False, robots=None):
        self.opts = opts
        self.limiter = limiter
        self.resolver = resolver
        self.connect = connect
        self.url_blocked = url_blocked
        ua = user_agent(opts.user_agent_token, robots_txt=not opts.ignore_robots_txt, contact=opts.contact)
        self._header_block = (f"User-Agent: {ua}\r\n"
                              "Accept: image/*,*/*;q=0.5\r\nAccept-Encoding: identity\r\n\r\n").encode("latin-1")
        self._robots_header_block = (f"User-Agent: {ua}\r\n"
                                     "Accept: text/plain,*/*;q=0.5\r\nAccept-Encoding: identity\r\n\r\n").encode("latin-1")
        self._idle = _IdleConnections()
        self._addresses: dict[tuple[str, int], tuple[float, list[str] | str]] = {}  # -> (expiry, addrs or refusal)
        self.tokens = {PRODUCT} | ({opts.user_agent_token.strip().lower()} if opts.user_agent_token else set())
        self.disallowed = {d.strip().lower() for d in opts.disallowed_header_directives}
        self.headers = HeaderRules(opts)  # Content-Usage, tdm-reservation (as --respect says)
        from clipfleet.workers.download.robots import RobotsRules, TdmRepRules
        if robots is None and not opts.ignore_robots_txt and self.headers.honoured & ROBOTS_CONVENTIONS:
            robots = RobotsRules(self, getattr(limiter, "redis", None), opts)
        self.robots = robots  # None: robots.txt ignored (--ignore-robots-txt, --respect)
        self.tdmrep = TdmRepRules(self, getattr(limiter, "redis", None), opts) if self.headers.tdm else None
        if "x-robots-tag" not in self.headers.honoured:
            self.disallowed = set()
        self.counts: Counter = Counter()  # politeness events, read by the stage as deltas
        self._counts_lock = threading.Lock()

    def count(self, name: str, n: float = 1) -> None:
        with self._counts_lock:
            self.counts[name] += n

    def counted(self) -> dict[str, float]:
        """A copy of the counts, safe while fetching threads add to them."""
        with self._counts_lock:
            return dict(self.counts)

    def fetch(self, url: str) -> bytes:
        """The body of the image at `url`, or FetchFailed with a message that says why not."""
        return self._fetch(url, robots_txt=False)

    def fetch_robots(self, url: str) -> RobotsAnswer:
        """The robots.txt at `url` (redirects followed), or FetchFailed when it is unreachable."""
        return self._fetch(url, robots_txt=True)

    def _fetch(self, url: str, robots_txt: bool):
        budget = Budget(self.opts.download_timeout)
        attempt = throttled = 0
        max_hold = self.limiter.limits.max_hold_off if self.limiter is not None else budget.total
        while True:
            try:
                return self._follow(url, budget, robots_txt)
            except _Throttled as exc:
                throttled += 1
                self.count("throttled")
                pause = exc.retry_after if exc.retry_after is not None else DEFAULT_HOLD_S
                if pause > max_hold:
                    raise FetchFailed(str(exc)) from None
                if pause >= budget.left() or throttled >= MAX_THROTTLED_ATTEMPTS:
                    raise FetchFailed(f"{exc} (no time left to retry)") from None
                # The host's pause is this image's wait: it counts against its deadline. With a
                # limiter, the hold-off is in Redis and the next slot waits for it.
                budget.spent += pause
                if self.limiter is None:
                    time.sleep(pause)
                self.count("throttled_retries")
            except _Transient as exc:
                if attempt == self.opts.download_retries:
                    raise FetchFailed(str(exc)) from None
                pause = self.retry_backoff * 2 ** attempt * random.uniform(0.8, 1.2)
                attempt += 1
                if pause >= budget.left():
                    raise FetchFailed(f"{exc} (no time left to retry)") from None
                time.sleep(pause)
                budget.spent += pause

    def _follow(self, url: str, budget: Budget, robots_txt: bool):
        seen = {url}
        for _ in range(self.max_redirects + 1):
            location = self._request(url, budget, robots_txt)
            if not isinstance(location, str):
                return location
            nxt = urljoin(url, location)
            if nxt in seen:
                raise FetchFailed(f"redirect loop: {nxt} was already visited")
            seen.add(nxt)
            url = nxt
        raise FetchFailed(f"too many redirects (more than {self.max_redirects})")

    def _request(self, url: str, budget: Budget, robots_txt: bool):
        """One hop: the body on 200 (a RobotsAnswer for robots.txt), the Location on a redirect."""
        blocked = self.url_blocked(url)
        if blocked:  # a kind ("do-not-train") or True (the blocklist)
            kind = blocked if isinstance(blocked, str) else "blocklist url"
            raise FetchFailed("on the do-not-train list" if kind == "do-not-train" else "blocklisted url", refused=kind)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchFailed(f"unsupported url: {url[:200]}")
        try:
            host = ascii_host(parts.hostname)
        except UnicodeError:
            host = ""
        if not HOST_CHARS.fullmatch(host):  # it goes into the Host header as it is
            raise FetchFailed(f"unsupported url: bad host name in {url[:200]}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchFailed(f"unsupported url: bad port in {url[:200]}") from None
        addrs = self._checked_addresses(host, port)
        interval = 0.0  # between request starts, as the host's robots.txt asks (Crawl-delay)
        if not robots_txt and self.robots is not None:
            interval = self.robots.check(parts.scheme, host, port, url)  # fetches robots.txt once
        if not robots_txt and self.tdmrep is not None:
            self.tdmrep.check(parts.scheme, host, port, url)  # fetches tdmrep.json once
        if self.limiter is None:
            return self._exchange(parts, host, port, addrs, budget, robots_txt)[0]
        try:
            token = self.limiter.acquire(host, interval)
        except HostHeldOff as exc:
            raise FetchFailed(str(exc)) from None
        outcome, latency, retry_after = NONE, 0.0, None
        try:
            result, latency = self._exchange(parts, host, port, addrs, budget, robots_txt)
            outcome = OK
            return result
        except _Throttled as exc:
            outcome = THROTTLED
            retry_after = exc.retry_after if exc.retry_after is not None else DEFAULT_HOLD_S
            raise
        except _Transient:
            outcome = ERROR
            raise
        except FetchFailed as exc:
            if exc.host_trouble:
                outcome = ERROR
            elif exc.latency is not None:
                outcome, latency = OK, exc.latency  # it answered (404, redirect without Location)
            elif exc.refused in HEADER_KINDS:
                outcome = OK  # the host answered well; we chose not to read on
            raise
        finally:
            self.limiter.release(host, token, outcome, latency, retry_after)

    def _checked_addresses(self, host: str, port: int) -> list[str]:
        """The host's addresses, all checked by the guard; refusals are cached too, failures not."""
        now = time.monotonic()
        cached = self._addresses.get((host, port))
        if cached is None or cached[0] <= now:
            try:
                found: list[str] | str = checked_addresses(host, port, self.opts.allow_private_addresses,
                                                           self.resolver)
            except AddressRefused as exc:
                found = str(exc)
            except OSError as exc:
                raise FetchFailed(f"dns error: {host}: {exc}") from None
            if len(self._addresses) >= ADDRESS_CACHE_SIZE:
                self._addresses.clear()
            cached = self._addresses[(host, port)] = (now + ADDRESS_CACHE_S, found)
        if isinstance(cached[1], str):
            raise FetchFailed(cached[1], refused="private address")
        return cached[1]

    def _exchange(self, parts, host: str, port: int, addrs: list[str], budget: Budget, robots_txt: bool):
        """One request and response, on this thread's idle connection to the host when it has one.

        Returns (what _outcome made of the response, the host's latency to its headers)."""
        if budget.left() <= 0:
            raise FetchFailed(budget.timeout_message(), host_trouble=True)
        target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=TARGET_SAFE)
        default_port = 443 if parts.scheme == "https" else 80
        authority = (f"[{host}]" if ":" in host else host) + ("" if port == default_port else f":{port}")
        request = b"GET %s HTTP/1.1\r\nHost: %s\r\n%s" % (
            target.encode("ascii"), authority.encode("ascii"),
            self._robots_header_block if robots_txt else self._header_block)
        key = (parts.scheme, host, port)
        started = time.monotonic()
        deadline = started + budget.left()
        try:
            idle = self._idle.conns.pop(key, None)
            if idle is not None:
                addr, sock = idle
                if addr in addrs:  # still an address the guard just passed
                    try:
                        return self._exchange_on(sock, addr, key, request, deadline, budget, True, robots_txt)
                    except _StaleConnection:
                        pass  # the server closed it while it sat idle: ask on a fresh one
                else:
                    sock.close()
            addr, sock = self._open(parts.scheme, host, port, addrs, deadline, budget)
            return self._exchange_on(sock, addr, key, request, deadline, budget, False, robots_txt)
        finally:
            budget.spent += time.monotonic() - started

    def _open(self, scheme: str, host: str, port: int, addrs: list[str], deadline: float,
              budget: Budget) -> tuple[str, socket.socket]:
        """A connection to the first checked address that takes one (TLS for https)."""
        last: Exception = OSError("no address")
        for addr in addrs:
            try:
                sock = self.connect((addr, port), max(0.01, deadline - time.monotonic()))
            except OSError as exc:
                last = exc
                continue
            if scheme != "https":
                return addr, sock
            try:
                return addr, http1.tls_handshake(sock, tls_context(), host, deadline)
            except http1.Timeout:
                sock.close()
                raise FetchFailed(budget.timeout_message(), host_trouble=True) from None
            except ssl.SSLCertVerificationError as exc:  # asking again gets the same certificate
                sock.close()
                raise FetchFailed(f"tls error: {exc.verify_message or exc}") from None
            except OSError as exc:
                sock.close()
                raise _Transient(f"connection error: {exc.__class__.__name__}: {exc}") from None
        if isinstance(last, (socket.timeout, TimeoutError)):
            raise FetchFailed(budget.timeout_message(), host_trouble=True)
        if isinstance(last, ConnectionRefusedError):
            raise FetchFailed(f"connection refused: {host}:{port}", host_trouble=True)
        raise _Transient(f"connection error: {last.__class__.__name__}: {last}")

    def _exchange_on(self, sock: socket.socket, addr: str, key: tuple, request: bytes, deadline: float,
                     budget: Budget, reused: bool, robots_txt: bool):
        keep = False
        sent = time.monotonic()
        try:
            try:
                if robots_txt:
                    response = http1.exchange(sock, request, deadline, ROBOTS_MAX_BYTES, truncate=True)
                else:
                    response = http1.exchange(sock, request, deadline, self.opts.max_image_bytes,
                                              on_headers=self._check_opt_out)
            except http1.Closed as exc:
                if reused and exc.fresh:
                    raise _StaleConnection() from None
                raise _Transient(f"connection error: {exc}") from None
            except (ConnectionResetError, BrokenPipeError) as exc:
                if reused:
                    raise _StaleConnection() from None
                raise _Transient(f"connection error: {exc.__class__.__name__}: {exc}") from None
            except http1.Timeout:
                raise FetchFailed(budget.timeout_message(), host_trouble=True) from None
            except http1.TooLarge as exc:
                raise FetchFailed(str(exc)) from None
            except http1.ProtocolError as exc:
                raise _Transient(f"connection error: bad response: {exc}") from None
            except OSError as exc:
                raise _Transient(f"connection error: {exc.__class__.__name__}: {exc}") from None
            keep = response.keep_alive
            latency = (response.headers_at or time.monotonic()) - sent
            try:
                return self._outcome(response, robots_txt), latency
            except FetchFailed as exc:  # a 404 and the like: the host answered, and how fast counts
                exc.latency = latency
                raise
        finally:
            if keep:
                self._keep_idle(key, addr, sock)
            else:
                sock.close()

    def _keep_idle(self, key: tuple, addr: str, sock: socket.socket) -> None:
        conns = self._idle.conns
        conns[key] = (addr, sock)
        while len(conns) > IDLE_PER_THREAD:  # the oldest goes: hosts repeat soon or not at all
            conns.pop(next(iter(conns)))[1].close()

    def _check_opt_out(self, response: http1.Response) -> None:
        """Called as a 200's headers arrive: an opt-out ends the exchange before the body is read."""
        directive = robots_refusal(response.header_values("X-Robots-Tag"), self.tokens, self.disallowed)
        if directive:
            self.count("opt_out_before_body")
            raise FetchFailed(f"disallowed by X-Robots-Tag: {directive}", refused="x-robots-tag")
        said = self.headers.refusal(response)
        if said:
            self.count("opt_out_before_body")
            raise FetchFailed(said[1], refused=said[0])

    def _outcome(self, response: http1.Response, robots_txt: bool):
        """The body of a 200, the Location of a redirect; raises for anything else."""
        status, reason = response.status, response.reason
        if status in REDIRECT_CODES:
            location = response.header("Location")
            if not location:
                raise FetchFailed(f"redirect {status} without a Location")
            return location
        if status in THROTTLE_CODES:
            retry_after = retry_after_seconds(response.header("Retry-After"))
            hint = f" (retry after {retry_after:g}s)" if retry_after is not None else ""
            raise _Throttled(f"http {status} {reason}{hint}", retry_after)
        if status in TRANSIENT_CODES:
            raise _Transient(f"http {status} {reason}")
        if robots_txt:
            return RobotsAnswer(status, response.body if status == 200 else b"", response.truncated)
        if status != 200:
            raise FetchFailed(f"http {status} {reason}")
        return response.body
