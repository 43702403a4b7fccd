"""Fetch one image over HTTP(S): guarded, bounded and polite.

- Every hop (the URL and each redirect) is resolved and checked by address_guard before any
  connection, and the connection goes to the checked address. Redirects are followed here,
  a bounded number of times, with loop detection.
- One deadline covers the whole network time of an image (connect, headers, body, retries),
  enforced by a watchdog that shuts the socket down, so a server that drips one byte a
  second cannot hold a thread past it. Waiting for a polite turn does not count against it.
- A byte limit is checked on Content-Length and again while reading.
- Each request takes a per-host slot from the fleet-wide DomainLimiter; Retry-After on 429
  and 503 is shared with the whole fleet through it. Only transient failures are retried.
- X-Robots-Tag noai / noimageai (for everyone or for our token) means the image is not used.
- Each thread keeps a few connections alive after a 200, reused only for an address the
  guard passes again for the next request.
"""
from __future__ import annotations

import functools
import heapq
import http.client
import itertools
import os
import random
import socket
import ssl
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

from shared import __version__
from workers.address_guard import AddressRefused, Resolver, checked_addresses
from workers.politeness import HostHeldOff

REDIRECT_CODES = {301, 302, 303, 307, 308}
# Worth asking again later: overload, gateway trouble, rate limiting, request timeout.
TRANSIENT_CODES = {408, 425, 429, 500, 502, 503, 504}
DISALLOWED_DIRECTIVES = ("noai", "noimageai")
PRODUCT = "clipfleet"
READ_CHUNK = 256 * 1024
IDLE_PER_THREAD = 4  # kept-alive connections per fetching thread
WATCHDOG_TICK_S = 0.05  # deadline precision
# Characters left as they are in a request target; others (non-ASCII, spaces) are %-encoded,
# as browsers do, since URLs from the web are often not ASCII.
TARGET_SAFE = "/?&=:;@!$'()*+,%[]~"

Connector = Callable[[tuple[str, int], float], socket.socket]


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = 10.0                # total network time per image, all hops and retries
    max_bytes: int = 32 * 2**20          # per image, as downloaded
    max_redirects: int = 5
    retries: int = 2                     # extra attempts, for transient failures only
    retry_backoff: float = 0.5           # first backoff in seconds; doubles per attempt
    allow_private_addresses: bool = False
    user_agent_token: str | None = None
    disallowed_directives: tuple[str, ...] = DISALLOWED_DIRECTIVES


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
    ua = f"Mozilla/5.0 (compatible; {PRODUCT}/{__version__}; image-text dataset downloader; honours X-Robots-Tag noai"
    return f"{ua}; {token})" if token else f"{ua})"


def robots_refusal(headers: http.client.HTTPMessage, tokens: set[str], disallowed: set[str]) -> str | None:
    """The X-Robots-Tag directive that forbids using this image, if any.

    A value is either `directives` (for every agent) or `agent: directives`."""
    for value in headers.get_all("X-Robots-Tag") or []:
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


class DeadlineWatchdog:
    """One thread that shuts sockets down when their deadline passes.

    It holds a dup() of each socket: shutdown() on the dup ends the TCP connection for every
    descriptor sharing it, including a TLS socket wrapped around the original, and a blocked
    recv in the fetching thread returns at once.
    """

    def __init__(self):
        self._heap: list = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._pid = None

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():  # first use, or first use in a forked worker process
            self._pid = os.getpid()
            self._heap = []
            threading.Thread(target=self._run, name="fetch-deadlines", daemon=True).start()

    def watch(self, sock: socket.socket, deadline: float) -> list:
        entry = [deadline, next(self._seq), sock.dup(), False]  # deadline, seq, dup, fired
        with self._cond:
            self._ensure_thread()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:  # only an earlier deadline needs the thread awake sooner
                self._cond.notify()
        return entry

    def unwatch(self, entry: list) -> bool:
        """Stop watching; returns whether the deadline had already fired."""
        with self._cond:
            dup, entry[2] = entry[2], None
        if dup is not None:
            dup.close()
        return entry[3]

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    # Most entries are unwatched long before their deadline; waking at most
                    # every WATCHDOG_TICK_S to drop them keeps this thread off the GIL.
                    self._cond.wait(max(delay, WATCHDOG_TICK_S))
                    continue
                entry = heapq.heappop(self._heap)
                entry[3] = True
                try:
                    entry[2].shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


WATCHDOG = DeadlineWatchdog()


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
    def __init__(self, opts: FetchOptions, limiter=None, resolver: Resolver = socket.getaddrinfo,
                 connect: Connector = socket.create_connection,
                 url_blocked: Callable[[str], bool] = lambda url: False):
        self.opts = opts
        self.limiter = limiter
        self.resolver = resolver
        self.connect = connect
        self.url_blocked = url_blocked
        self.headers = {"User-Agent": user_agent(opts.user_agent_token), "Accept": "image/*,*/*;q=0.5",
                        "Accept-Encoding": "identity"}
        self._idle = _IdleConnections()
        self.tokens = {PRODUCT} | ({opts.user_agent_token.strip().lower()} if opts.user_agent_token else set())
        self.disallowed = {d.strip().lower() for d in opts.disallowed_directives}

    def fetch(self, url: str) -> bytes:
        """The body of the image at `url`, or FetchFailed with a message that says why not."""
        budget = Budget(self.opts.timeout)
        for attempt in range(self.opts.retries + 1):
            try:
                return self._follow(url, budget)
            except _Transient as exc:
                if attempt == self.opts.retries:
                    raise FetchFailed(str(exc)) from None
                if exc.retry_after is not None and self.limiter is not None:
                    if exc.retry_after > self.limiter.limits.max_hold_off:
                        raise FetchFailed(str(exc)) from None
                    continue  # the host's hold-off is in the limiter; the next slot waits for it
                pause = exc.retry_after if exc.retry_after is not None else \
                    self.opts.retry_backoff * 2 ** attempt * random.uniform(0.8, 1.2)
                if pause >= budget.left():
                    raise FetchFailed(f"{exc} (no time left to retry)") from None
                time.sleep(pause)
                budget.spent += pause
        raise AssertionError("unreachable")

    def _follow(self, url: str, budget: Budget) -> bytes:
        seen = {url}
        for _ in range(self.opts.max_redirects + 1):
            location = self._request(url, budget)
            if isinstance(location, bytes):
                return location
            nxt = urljoin(url, location)
            if nxt in seen:
                raise FetchFailed(f"redirect loop: {nxt} was already visited")
            seen.add(nxt)
            url = nxt
        raise FetchFailed(f"too many redirects (more than {self.opts.max_redirects})")

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
            raise FetchFailed(f"unsupported url: bad host name in {url[:200]}") from None
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchFailed(f"unsupported url: bad port in {url[:200]}") from None
        try:
            addrs = checked_addresses(host, port, self.opts.allow_private_addresses, self.resolver)
        except AddressRefused as exc:
            raise FetchFailed(str(exc), refused="private address") from None
        except OSError as exc:
            raise FetchFailed(f"dns error: {host}: {exc}") from None
        try:
            slot = self.limiter.slot(host) if self.limiter is not None else nullcontext()
            with slot:
                return self._exchange(parts, host, port, addrs, budget)
        except HostHeldOff as exc:
            raise FetchFailed(str(exc)) from None

    def _exchange(self, parts, host: str, port: int, addrs: list[str], budget: Budget) -> bytes | str:
        """One request and response, on this thread's idle connection to the host when it has one."""
        if budget.left() <= 0:
            raise FetchFailed(budget.timeout_message())
        target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=TARGET_SAFE)
        key = (parts.scheme, host, port)
        idle = self._idle.conns.pop(key, None)
        if idle is not None:
            addr, conn = idle
            if addr in addrs:  # still an address the guard just passed
                try:
                    return self._exchange_on(conn, addr, key, target, budget)
                except _StaleConnection:
                    pass  # the server closed it while it sat idle: ask on a fresh one
            else:
                conn.close()
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=budget.left(), context=tls_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=budget.left())
        return self._exchange_on(conn, None, key, target, budget, addrs)

    def _exchange_on(self, conn, addr: str | None, key: tuple, target: str, budget: Budget,
                     addrs: list[str] | None = None) -> bytes | str:
        host, port = key[1], key[2]
        started = time.monotonic()
        deadline = started + budget.left()
        watched, connected = [], [addr]
        if addr is None:  # a new connection: to a checked address, watched from the start
            # The one hook http.client has for this: connect to a checked address, not the name.
            conn._create_connection = self._connector(addrs, port, deadline, watched, connected)
        else:
            conn.sock.settimeout(budget.left())
            watched.append(WATCHDOG.watch(conn.sock, deadline))
        keep = False
        try:
            try:
                conn.request("GET", target, headers=self.headers)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if addr is not None and not watched[0][3]:
                    raise _StaleConnection() from None
                raise
            result = self._read_response(resp, host, budget)
            if watched and watched[0][3]:  # cut at the deadline: what we read may look complete
                raise FetchFailed(budget.timeout_message())
            keep = isinstance(result, bytes) and not resp.will_close
            return result
        except (FetchFailed, _Transient, _StaleConnection):
            raise
        except (socket.timeout, TimeoutError):
            raise FetchFailed(budget.timeout_message()) from None
        except ssl.SSLCertVerificationError as exc:  # asking again gets the same certificate
            raise FetchFailed(f"tls error: {exc.verify_message or exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            if watched and watched[0][3]:  # the watchdog cut it at the deadline
                raise FetchFailed(budget.timeout_message()) from None
            if isinstance(exc, ConnectionRefusedError):
                raise FetchFailed(f"connection refused: {host}:{port}") from None
            raise _Transient(f"connection error: {exc.__class__.__name__}: {exc}") from None
        finally:
            fired = any([WATCHDOG.unwatch(w) for w in watched])
            if keep and not fired:
                self._keep_idle(key, connected[-1], conn)
            else:
                conn.close()
            budget.spent += time.monotonic() - started
            if fired and budget.left() > 0:
                budget.spent = budget.total

    def _connector(self, addrs: list[str], port: int, deadline: float, watched: list, connected: list):
        def connect_checked(_address, timeout, source_address=None):
            # http.client asks for (host, port); we connect to an address checked above.
            last: Exception = OSError("no address")
            for addr in addrs:
                try:
                    sock = self.connect((addr, port), max(0.01, deadline - time.monotonic()))
                except OSError as exc:
                    last = exc
                    continue
                watched.append(WATCHDOG.watch(sock, deadline))
                connected.append(addr)
                return sock
            raise last
        return connect_checked

    def _keep_idle(self, key: tuple, addr: str, conn) -> None:
        conns = self._idle.conns
        conns[key] = (addr, conn)
        while len(conns) > IDLE_PER_THREAD:  # the oldest goes: hosts repeat soon or not at all
            conns.pop(next(iter(conns)))[1].close()

    def _read_response(self, resp: http.client.HTTPResponse, host: str, budget: Budget) -> bytes | str:
        if resp.status in REDIRECT_CODES:
            location = resp.getheader("Location")
            if not location:
                raise FetchFailed(f"redirect {resp.status} without a Location")
            return location
        if resp.status in TRANSIENT_CODES:
            retry_after = retry_after_seconds(resp.getheader("Retry-After")) if resp.status in (429, 503) else None
            if retry_after is not None and self.limiter is not None:
                self.limiter.hold_off(host, retry_after)
            hint = f" (retry after {retry_after:g}s)" if retry_after is not None else ""
            raise _Transient(f"http {resp.status} {resp.reason}{hint}", retry_after)
        if resp.status != 200:
            raise FetchFailed(f"http {resp.status} {resp.reason}")
        directive = robots_refusal(resp.msg, self.tokens, self.disallowed)
        if directive:
            raise FetchFailed(f"disallowed by X-Robots-Tag: {directive}", refused="x-robots-tag")
        limit = self.opts.max_bytes
        if resp.length is not None and resp.length > limit:
            raise FetchFailed(f"too large: Content-Length {resp.length} is over {limit} bytes")
        chunks, size = [], 0
        while True:
            chunk = resp.read(min(READ_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise FetchFailed(f"too large: more than {limit} bytes")
        return b"".join(chunks)
