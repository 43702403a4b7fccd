"""Fetch one image over HTTP(S): guarded, bounded and polite.

- Every hop (the URL and each redirect) is resolved and checked by address_guard before any
  connection, and the connection goes to the checked address. Redirects are followed here,
  a bounded number of times, with loop detection.
- One deadline covers the whole network time of an image (connect, TLS, headers, body,
  retries): every read waits only for the time left (workers/http1.py), so a server that
  drips one byte a second cannot hold a thread past it. Waiting for a polite turn does not
  count against it.
- A byte limit is checked on Content-Length and again while reading.
- Each request takes a per-host slot from the fleet-wide DomainLimiter; Retry-After on 429
  and 503 is shared with the whole fleet through it. Only transient failures are retried.
- X-Robots-Tag noai / noimageai (for everyone or for our token) means the image is not used.
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
from contextlib import nullcontext
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

from clipfleet.shared import __version__
from clipfleet.workers.download import http1
from clipfleet.workers.download.options import DownloadOptions
from clipfleet.workers.download.guard import AddressRefused, Resolver, checked_addresses
from clipfleet.workers.download.politeness import HostHeldOff

REDIRECT_CODES = {301, 302, 303, 307, 308}
# Worth asking again later: overload, gateway trouble, rate limiting, request timeout.
TRANSIENT_CODES = {408, 425, 429, 500, 502, 503, 504}
PRODUCT = "clipfleet"
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
    """Final outcome for a URL that gave no image. `refused` names a deliberate refusal."""

    def __init__(self, message: str, refused: str | None = None):
        super().__init__(message)
        self.refused = refused


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


def user_agent(token: str | None) -> str:
    """Says who we are and how to tell us no; the token lets operators name their crawl."""
    if token is not None and (not token.isprintable() or not token.isascii()):
        raise ValueError(f"the user agent token must be printable ASCII, got {token!r}")
    ua = f"Mozilla/5.0 (compatible; {PRODUCT}/{__version__}; image-text dataset downloader; honours X-Robots-Tag noai"
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
    max_redirects = 5
    retry_backoff = 0.5  # first backoff in seconds; doubles per attempt

    def __init__(self, opts: DownloadOptions, limiter=None, resolver: Resolver = socket.getaddrinfo,
                 connect: Connector = socket.create_connection,
                 url_blocked: Callable[[str], bool] = lambda url: False):
        self.opts = opts
        self.limiter = limiter
        self.resolver = resolver
        self.connect = connect
        self.url_blocked = url_blocked
        self._header_block = (f"User-Agent: {user_agent(opts.user_agent_token)}\r\n"
                              "Accept: image/*,*/*;q=0.5\r\nAccept-Encoding: identity\r\n\r\n").encode("latin-1")
        self._idle = _IdleConnections()
        self._addresses: dict[tuple[str, int], tuple[float, list[str] | str]] = {}  # -> (expiry, addrs or refusal)
        self.tokens = {PRODUCT} | ({opts.user_agent_token.strip().lower()} if opts.user_agent_token else set())
        self.disallowed = {d.strip().lower() for d in opts.disallowed_header_directives}

    def fetch(self, url: str) -> bytes:
        """The body of the image at `url`, or FetchFailed with a message that says why not."""
        budget = Budget(self.opts.download_timeout)
        for attempt in range(self.opts.download_retries + 1):
            try:
                return self._follow(url, budget)
            except _Transient as exc:
                if attempt == self.opts.download_retries:
                    raise FetchFailed(str(exc)) from None
                if exc.retry_after is not None and self.limiter is not None:
                    if exc.retry_after > self.limiter.limits.max_hold_off:
                        raise FetchFailed(str(exc)) from None
                    continue  # the host's hold-off is in the limiter; the next slot waits for it
                pause = exc.retry_after if exc.retry_after is not None else \
                    self.retry_backoff * 2 ** attempt * random.uniform(0.8, 1.2)
                if pause >= budget.left():
                    raise FetchFailed(f"{exc} (no time left to retry)") from None
                time.sleep(pause)
                budget.spent += pause
        raise AssertionError("unreachable")

    def _follow(self, url: str, budget: Budget) -> bytes:
        seen = {url}
        for _ in range(self.max_redirects + 1):
            location = self._request(url, budget)
            if isinstance(location, bytes):
                return location
            nxt = urljoin(url, location)
            if nxt in seen:
                raise FetchFailed(f"redirect loop: {nxt} was already visited")
            seen.add(nxt)
            url = nxt
        raise FetchFailed(f"too many redirects (more than {self.max_redirects})")

    def _request(self, url: str, budget: Budget) -> bytes | str:
        """One hop: the body on 200, the Location on a redirect; raises otherwise."""
        if self.url_blocked(url):
            raise FetchFailed("blocklisted url", refused="blocklist url")
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
        try:
            slot = self.limiter.slot(host) if self.limiter is not None else nullcontext()
            with slot:
                return self._exchange(parts, host, port, addrs, budget)
        except HostHeldOff as exc:
            raise FetchFailed(str(exc)) from None

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

    def _exchange(self, parts, host: str, port: int, addrs: list[str], budget: Budget) -> bytes | str:
        """One request and response, on this thread's idle connection to the host when it has one."""
        if budget.left() <= 0:
            raise FetchFailed(budget.timeout_message())
        target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=TARGET_SAFE)
        default_port = 443 if parts.scheme == "https" else 80
        authority = (f"[{host}]" if ":" in host else host) + ("" if port == default_port else f":{port}")
        request = b"GET %s HTTP/1.1\r\nHost: %s\r\n%s" % (target.encode("ascii"), authority.encode("ascii"),
                                                          self._header_block)
        key = (parts.scheme, host, port)
        started = time.monotonic()
        deadline = started + budget.left()
        try:
            idle = self._idle.conns.pop(key, None)
            if idle is not None:
                addr, sock = idle
                if addr in addrs:  # still an address the guard just passed
                    try:
                        return self._exchange_on(sock, addr, key, request, deadline, budget, reused=True)
                    except _StaleConnection:
                        pass  # the server closed it while it sat idle: ask on a fresh one
                else:
                    sock.close()
            addr, sock = self._open(parts.scheme, host, port, addrs, deadline, budget)
            return self._exchange_on(sock, addr, key, request, deadline, budget, reused=False)
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
                raise FetchFailed(budget.timeout_message()) from None
            except ssl.SSLCertVerificationError as exc:  # asking again gets the same certificate
                sock.close()
                raise FetchFailed(f"tls error: {exc.verify_message or exc}") from None
            except OSError as exc:
                sock.close()
                raise _Transient(f"connection error: {exc.__class__.__name__}: {exc}") from None
        if isinstance(last, (socket.timeout, TimeoutError)):
            raise FetchFailed(budget.timeout_message())
        if isinstance(last, ConnectionRefusedError):
            raise FetchFailed(f"connection refused: {host}:{port}")
        raise _Transient(f"connection error: {last.__class__.__name__}: {last}")

    def _exchange_on(self, sock: socket.socket, addr: str, key: tuple, request: bytes, deadline: float,
                     budget: Budget, reused: bool) -> bytes | str:
        keep = False
        try:
            try:
                response = http1.exchange(sock, request, deadline, self.opts.max_image_bytes)
            except http1.Closed as exc:
                if reused and exc.fresh:
                    raise _StaleConnection() from None
                raise _Transient(f"connection error: {exc}") from None
            except (ConnectionResetError, BrokenPipeError) as exc:
                if reused:
                    raise _StaleConnection() from None
                raise _Transient(f"connection error: {exc.__class__.__name__}: {exc}") from None
            except http1.Timeout:
                raise FetchFailed(budget.timeout_message()) from None
            except http1.TooLarge as exc:
                raise FetchFailed(str(exc)) from None
            except http1.ProtocolError as exc:
                raise _Transient(f"connection error: bad response: {exc}") from None
            except OSError as exc:
                raise _Transient(f"connection error: {exc.__class__.__name__}: {exc}") from None
            keep = response.keep_alive
            return self._outcome(response, key[1])
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

    def _outcome(self, response: http1.Response, host: str) -> bytes | str:
        """The body of a 200, the Location of a redirect; raises for anything else."""
        status, reason = response.status, response.reason
        if status in REDIRECT_CODES:
            location = response.header("Location")
            if not location:
                raise FetchFailed(f"redirect {status} without a Location")
            return location
        if status in TRANSIENT_CODES:
            retry_after = retry_after_seconds(response.header("Retry-After")) if status in (429, 503) else None
            if retry_after is not None and self.limiter is not None:
                self.limiter.hold_off(host, retry_after)
            hint = f" (retry after {retry_after:g}s)" if retry_after is not None else ""
            raise _Transient(f"http {status} {reason}{hint}", retry_after)
        if status != 200:
            raise FetchFailed(f"http {status} {reason}")
        directive = robots_refusal(response.header_values("X-Robots-Tag"), self.tokens, self.disallowed)
        if directive:
            raise FetchFailed(f"disallowed by X-Robots-Tag: {directive}", refused="x-robots-tag")
        return response.body
