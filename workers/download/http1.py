"""One HTTP/1.1 GET and its response on a socket we own, bounded by a deadline and a byte limit.

httptools (llhttp) parses the response: status, headers, Content-Length, chunked and
read-until-close bodies. Every read waits at most the time left before the deadline, so a
server that drips a byte a second cannot stretch one image past it, and no watchdog thread
is needed. This replaces http.client on the hot path: its email-based header parsing and
buffered file objects cost about four times the CPU of the whole exchange here.
"""
from __future__ import annotations

import select
import socket
import ssl
import time
from typing import Callable

import httptools

RECV_BYTES = 256 * 1024
# Status line and headers (of all 1xx responses too): a server streaming header lines forever
# must not grow memory until the deadline. http.client allows 100 lines of 64 KiB.
MAX_HEAD_BYTES = 256 * 1024


class Timeout(Exception):
    """The deadline passed before the response was complete."""


class TooLarge(Exception):
    """The body is, or announces itself as, over the byte limit."""


class Closed(Exception):
    """The server closed the connection before a complete response. `fresh`: before any byte of it."""

    def __init__(self, message: str, fresh: bool):
        super().__init__(message)
        self.fresh = fresh


class ProtocolError(Exception):
    """The response is not HTTP/1.x as llhttp reads it."""


class Response:
    """What the parser reports for one response; the callbacks are httptools' protocol."""

    __slots__ = ("status", "reason", "headers", "chunks", "size", "length", "started", "headers_done",
                 "headers_at", "complete", "keep_alive", "truncated", "_parser")

    def __init__(self):
        self._start()
        self.started = False
        self._parser = httptools.HttpResponseParser(self)

    def _start(self):
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []  # (lower-case name, value)
        self.chunks: list[bytes] = []
        self.size = 0
        self.length: int | None = None
        self.headers_done = self.complete = self.keep_alive = self.truncated = False
        self.headers_at = 0.0  # monotonic time the final headers were complete (the host's latency)

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower().encode("ascii")
        return [v.decode("latin-1").strip() for k, v in self.headers if k == wanted]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def _framed(self) -> bool:
        """Whether the body's end is announced (length or chunked) rather than the connection's end."""
        return any(k in (b"content-length", b"transfer-encoding") for k, _ in self.headers)

    # -- httptools callbacks
    def on_message_begin(self):
        if self.complete:  # bytes after the response: never reuse this connection
            self.keep_alive = False
        self.started = True

    def on_status(self, reason: bytes):
        self.reason = reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes):
        name = name.lower()
        self.headers.append((name, value))
        if name == b"content-length":
            self.length = int(value) if value.strip().isdigit() else None

    def on_headers_complete(self):
        self.status = self._parser.get_status_code()
        self.headers_done = True
        self.headers_at = time.monotonic()

    def on_body(self, data: bytes):
        self.size += len(data)
        self.chunks.append(data)

    def on_message_complete(self):
        if self.status < 200:  # 100 Continue and the like: the final response follows
            self._start()
            return
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()


def wait_ready(sock: socket.socket, writable: bool, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise Timeout()
    poll = select.poll()  # not select(): a busy worker may hold descriptors over 1024
    poll.register(sock, select.POLLOUT if writable else select.POLLIN)
    if not poll.poll(left * 1000):
        raise Timeout()


def tls_handshake(sock: socket.socket, context: ssl.SSLContext, server_hostname: str,
                  deadline: float) -> ssl.SSLSocket:
    """Wrap and shake hands within the deadline as a whole (a socket timeout bounds each read only)."""
    tls = context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    tls.setblocking(False)
    while True:
        try:
            tls.do_handshake()
            return tls
        except ssl.SSLWantReadError:
            wait_ready(tls, False, deadline)
        except ssl.SSLWantWriteError:
            wait_ready(tls, True, deadline)


def exchange(sock: socket.socket, request: bytes, deadline: float, max_bytes: int,
             on_headers: Callable[[Response], None] | None = None, truncate: bool = False) -> Response:
    """Send `request` and read the response: its body only on a 200.

    `on_headers(response)` is called once the headers of a 200 are in, before any more of the
    body is read: it raises to stop there (an opt-out needs no body). With `truncate`, a body
    over `max_bytes` is cut there (`response.truncated`) instead of raising TooLarge.
    The socket is non-blocking: a read is tried first and waited for (up to the deadline)
    only when nothing is there, one system call instead of a poll before every read.
    The connection may be reused iff `response.keep_alive`."""
    if sock.gettimeout() != 0.0:  # new connections only: each switch is a system call
        sock.setblocking(False)
    _send_all(sock, request, deadline)
    response = Response()
    head_bytes = 0
    checked = on_headers is None
    while not response.complete:
        try:
            data = sock.recv(RECV_BYTES)
        except (BlockingIOError, ssl.SSLWantReadError):
            wait_ready(sock, False, deadline)
            continue
        except ssl.SSLWantWriteError:
            wait_ready(sock, True, deadline)
            continue
        if not data:
            if response.headers_done and not response._framed():
                response.complete = True  # the body ends when the connection does
                response.keep_alive = False
                break
            raise Closed("the server closed the connection before a complete response",
                         fresh=not response.started)
        if time.monotonic() > deadline:  # data that keeps coming, slowly, ends here too
            raise Timeout()
        try:
            response._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not response.complete:
                raise ProtocolError(str(exc)) from None
            response.keep_alive = False  # bytes after the response: never reuse this connection
        if not response.headers_done:
            head_bytes += len(data)
            if head_bytes > MAX_HEAD_BYTES:
                raise ProtocolError(f"response headers over {MAX_HEAD_BYTES} bytes")
            continue
        if response.status != 200:
            # Only an image's body is read: a redirect's or an error's stays unread (and the
            # connection unused) unless it came whole with the headers.
            response.keep_alive = response.keep_alive and response.complete
            return response
        if not checked:
            checked = True
            on_headers(response)
        if truncate and response.size > max_bytes:
            _cut(response, max_bytes)
            return response
        if response.length is not None and response.length > max_bytes and not truncate:
            raise TooLarge(f"too large: Content-Length {response.length} is over {max_bytes} bytes")
        if response.size > max_bytes:
            raise TooLarge(f"too large: more than {max_bytes} bytes")
    return response


def _cut(response: Response, max_bytes: int) -> None:
    """Keep the first `max_bytes` of the body; the rest of the connection is never read."""
    body = response.body[:max_bytes]
    response.chunks, response.size = [body], len(body)
    response.truncated = response.complete = True
    response.keep_alive = False


def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, ssl.SSLWantWriteError):
            wait_ready(sock, True, deadline)
        except ssl.SSLWantReadError:
            wait_ready(sock, False, deadline)
