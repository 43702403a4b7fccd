"""The HTTP/1.1 exchange under the fetcher: framing, limits, deadlines, reuse.

Each case is a scripted server on 127.0.0.1 that writes exact bytes, so what a lenient
library would smooth over (chunking, 1xx, bytes after the body, a silent TLS peer) is sent
as it is.
"""
from __future__ import annotations

import socket
import time

import pytest

from clipfleet.workers.download import http1
from tests.workers.download.scripted import read_request, replies, serve  # noqa: F401 (serve: a fixture)

REQUEST = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def ask(port: int, timeout: float = 2.0, max_bytes: int = 1000) -> http1.Response:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        return http1.exchange(sock, REQUEST, time.monotonic() + timeout, max_bytes)


def test_content_length_body_on_a_connection_kept_alive(serve):
    server = serve(replies(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Robots-Tag: a\r\nx-robots-tag: b\r\n\r\nhello"))
    response = ask(server.port)
    assert (response.status, response.reason, response.body) == (200, "OK", b"hello")
    assert response.keep_alive and response.header_values("X-Robots-Tag") == ["a", "b"]


def test_chunked_body_is_decoded(serve):
    server = serve(replies(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n"))
    response = ask(server.port)
    assert response.body == b"abcdefg" and response.keep_alive


def test_body_without_length_ends_with_the_connection(serve):
    server = serve(replies(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", then_close=True))
    response = ask(server.port)
    assert response.body == b"until the end" and not response.keep_alive


def test_informational_response_is_skipped(serve):
    server = serve(replies(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    response = ask(server.port)
    assert (response.status, response.body) == (200, b"ok")


def test_announced_length_over_the_limit_fails_before_the_body(serve):
    server = serve(replies(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"))  # and no body, ever
    with pytest.raises(http1.TooLarge, match="Content-Length 5000 is over 1000 bytes"):
        ask(server.port, timeout=30)


def test_unannounced_body_over_the_limit_fails_while_reading(serve):
    server = serve(replies(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n"))
    with pytest.raises(http1.TooLarge, match="more than 1000 bytes"):
        ask(server.port, timeout=30)


@pytest.mark.parametrize("pause_s, deadline_s", [
    (0.1, 1.0),     # a drip: each read alone waits less than the deadline
    (0.002, 0.5),   # a steady trickle: a read almost never has to wait at all
])
@pytest.mark.timeout(120)  # bounds a hang; the assertion below is about order, not speed
def test_a_slow_body_fails_at_the_deadline_for_the_whole_response(serve, pause_s, deadline_s):
    sent = [0]

    def slow(conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(100000):
            conn.sendall(b"x")
            sent[0] += 1
            time.sleep(pause_s)
    server = serve(slow)
    with pytest.raises(http1.Timeout):
        ask(server.port, timeout=deadline_s, max_bytes=10**6)
    # The body keeps coming, each read in time, yet the exchange gave up before its end: the
    # deadline is the whole response's, not a read's (the server needs 200 s or more to finish).
    assert sent[0] < 100000


def test_bytes_after_the_response_forbid_reuse(serve):
    server = serve(replies(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"))
    response = ask(server.port)
    assert response.body == b"ok" and not response.keep_alive


def test_not_http_is_a_protocol_error(serve):
    server = serve(replies(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    with pytest.raises(http1.ProtocolError):
        ask(server.port)


def test_closed_before_any_byte_is_fresh(serve):
    server = serve(lambda conn: read_request(conn))
    with pytest.raises(http1.Closed) as closed:
        ask(server.port)
    assert closed.value.fresh


def test_error_bodies_are_not_read_and_the_connection_not_reused(serve):
    server = serve(replies(b"HTTP/1.1 404 Not Found\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10))
    response = ask(server.port, max_bytes=10)
    assert response.status == 404 and not response.keep_alive


def test_endless_headers_are_cut_at_the_head_limit(serve):
    def endless(conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while True:
            conn.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
    server = serve(endless)
    with pytest.raises(http1.ProtocolError, match="headers over"):
        ask(server.port, timeout=30)


def test_endless_informational_responses_are_cut_at_the_head_limit(serve):
    def endless(conn):
        read_request(conn)
        while True:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 100)
    server = serve(endless)
    with pytest.raises(http1.ProtocolError, match="headers over"):
        ask(server.port, timeout=30)
