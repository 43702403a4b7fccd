"""The HTTP/1.1 exchange under the fetcher: framing, limits, deadlines, reuse and TLS.

Each case is a scripted server on 127.0.0.1 that writes exact bytes, so what a lenient
library would smooth over (chunking, 1xx, bytes after the body, a silent TLS peer) is sent
as it is.
"""
from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time

import pytest

from clipfleet.workers.download import fetch, http1
from clipfleet.workers.download.fetch import FetchFailed, Fetcher
from clipfleet.workers.download.options import DownloadOptions

REQUEST = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class ScriptedServer:
    """Accepts connections and runs `script(conn)` on each, in a thread of its own."""

    def __init__(self, script):
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.done.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        with conn:
            try:
                self.script(conn)
            except OSError:
                pass

    def close(self):
        self.done.set()
        self.listener.close()


@pytest.fixture
def serve():
    servers = []

    def start(script) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def read_request(conn) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return data
        data += chunk
    return data


def replies(*responses: bytes, then_close: bool = False):
    """A script answering each request on a connection with the next response."""
    def script(conn):
        for response in responses:
            if not read_request(conn):
                return
            conn.sendall(response)
        if not then_close:
            read_request(conn)  # hold the connection until the client is done with it
    return script


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
def test_a_slow_body_fails_at_the_deadline_for_the_whole_response(serve, pause_s, deadline_s):
    def slow(conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(100000):
            conn.sendall(b"x")
            time.sleep(pause_s)
    server = serve(slow)
    started = time.monotonic()
    with pytest.raises(http1.Timeout):
        ask(server.port, timeout=deadline_s, max_bytes=10**6)
    assert time.monotonic() - started < deadline_s + 0.5


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


# -- through the fetcher

def test_fetcher_reuses_a_kept_alive_connection_and_recovers_from_a_stale_one(serve):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    server = serve(replies(ok, ok, then_close=True))  # two answers, then it closes the connection
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_retries=0))
    url = f"http://127.0.0.1:{server.port}/a.jpg"
    assert [fetcher.fetch(url) for _ in range(3)] == [b"abc"] * 3
    assert server.connections == 2  # the third request found the kept one closed, asked on a new one


def test_fetcher_sends_the_host_and_our_headers(serve):
    seen = []

    def script(conn):
        seen.append(read_request(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    server = serve(script)
    Fetcher(DownloadOptions(allow_private_addresses=True)).fetch(f"http://127.0.0.1:{server.port}/p?q=1")
    head = seen[0].decode()
    assert head.startswith("GET /p?q=1 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n" in head and "User-Agent: Mozilla/5.0 (compatible; clipfleet/" in head


def test_a_token_that_could_inject_headers_is_refused():
    with pytest.raises(ValueError, match="printable ASCII"):
        Fetcher(DownloadOptions(user_agent_token="me\r\nX-Evil: 1"))


@pytest.fixture
def tls_files(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def tls_server_script(cert_path, key_path, body: bytes):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)

    def script(conn):
        with context.wrap_socket(conn, server_side=True) as tls:
            read_request(tls)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            read_request(tls)
    return script


def test_https_is_verified_and_fetched(serve, tls_files, monkeypatch):
    server = serve(tls_server_script(*tls_files, b"secure"))
    url = f"https://127.0.0.1:{server.port}/i.jpg"
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_retries=0))
    with pytest.raises(FetchFailed, match="tls error: .*certificate"):
        fetcher.fetch(url)  # self-signed: not trusted by the system's store
    trusting = ssl.create_default_context(cafile=str(tls_files[0]))
    monkeypatch.setattr(fetch, "tls_context", lambda: trusting)
    assert fetcher.fetch(url) == b"secure"


def test_a_silent_tls_peer_fails_at_the_deadline(serve):
    server = serve(lambda conn: time.sleep(5))  # accepts, never says a word
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_timeout=0.5, download_retries=0))
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="timeout: no complete response within 0.5s"):
        fetcher.fetch(f"https://127.0.0.1:{server.port}/i.jpg")
    assert time.monotonic() - started < 2


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
