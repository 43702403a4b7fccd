"""The sandbox server: images come back byte for byte, and each corner case misbehaves as listed."""
from __future__ import annotations

import hashlib
import http.client
import io
import ipaddress
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipfleet.sandbox.server import CORNER_CASES, DRIP_BYTES, DRIP_INTERVAL_S, HUGE_BODY_BYTES, SandboxServer

from .test_world import rows


def request(server, path: str, timeout: float = 5.0):
    """(status, headers, body) of one GET, following no redirects."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def open_stream(server, path: str, timeout: float = 5.0):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    connection.request("GET", path)
    return connection, connection.getresponse()


def raw_get(server, path: str, deadline_s: float) -> bytes:
    """Everything the server sends in `deadline_s` seconds, headers included."""
    received = b""
    with socket.create_connection((server.host, server.port), timeout=deadline_s) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    return received


def decodes(body: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(body)) as picture:
            picture.load()
        return True
    except Exception:
        return False


def test_images_are_served_byte_for_byte(world, server):
    content_types = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
    for row in rows(world, "images")[:40]:
        assert row["url"].startswith(server.url + "/img/")
        status, headers, body = request(server, urlsplit(row["url"]).path)
        assert status == 200
        assert headers["Content-Type"] == content_types[row["format"]]
        assert int(headers["Content-Length"]) == len(body)
        assert hashlib.sha256(body).hexdigest() == row["sha256"]


def test_keep_alive_serves_several_requests_on_one_connection(world, server):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=5)
    for row in rows(world, "images")[:5]:
        connection.request("GET", urlsplit(row["url"]).path + "?query=ignored")
        response = connection.getresponse()
        assert response.status == 200 and len(response.read()) == int(response.headers["Content-Length"])
    connection.close()


def test_unknown_paths_and_escapes_are_404(server):
    for path in ("/img/999999.jpg", "/pages/site-0/page-00000.html", "/../sandbox.json",
                 "/img/../../sandbox.json"):
        assert request(server, path)[0] == 404


# ----------------------------------------------------------------------------- the corner

def corner_path(case: str) -> str:
    return next(c.path for c in CORNER_CASES if c.case == case)


def check_ok(server):
    status, headers, body = request(server, corner_path("ok"))
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and decodes(body)


def check_not_found(server):
    assert request(server, corner_path("not_found"))[0] == 404


def check_server_error_then_ok(server):
    server.reset_counts()
    responses = [request(server, corner_path("server_error_then_ok")) for _ in range(4)]
    assert [status for status, _, _ in responses] == [500, 200, 500, 200]
    assert decodes(responses[1][2]) and decodes(responses[3][2])


def check_rate_limited(server):
    server.reset_counts()
    status, headers, _ = request(server, corner_path("rate_limited"))
    assert status == 429 and headers["Retry-After"] == "1"
    status, _, body = request(server, corner_path("rate_limited"))
    assert status == 200 and decodes(body)


def check_slow_drip(server):
    window = 2.0
    received = raw_get(server, corner_path("slow_drip"), deadline_s=window)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    announced = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-length")))
    assert announced > 10_000
    assert 0 < len(body) <= DRIP_BYTES * (window / DRIP_INTERVAL_S + 2)


def check_larger_than_announced(server):
    received = raw_get(server, corner_path("larger_than_announced"), deadline_s=2.0)
    head, _, body = received.partition(b"\r\n\r\n")
    announced = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                         if line.lower().startswith(b"content-length")))
    assert len(body) > announced
    status, _, honoured = request(server, corner_path("larger_than_announced"))
    assert status == 200 and len(honoured) == announced and not decodes(honoured)


def check_huge_body(server):
    connection, response = open_stream(server, corner_path("huge_body"))
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == HUGE_BODY_BYTES
    assert len(response.read(4 * 1024 * 1024)) == 4 * 1024 * 1024  # and it keeps coming
    connection.close()


def check_huge_body_unannounced(server):
    connection, response = open_stream(server, corner_path("huge_body_unannounced"))
    assert response.status == 200 and response.headers.get("Content-Length") is None
    assert len(response.read(4 * 1024 * 1024)) == 4 * 1024 * 1024
    connection.close()


def check_decompression_bomb(server):
    status, headers, body = request(server, corner_path("decompression_bomb"))
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert len(body) < 100_000
    width, height = struct.unpack(">II", body[16:24])  # from the IHDR chunk
    assert width * height >= 400_000_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))


def check_truncated_jpeg(server):
    status, headers, body = request(server, corner_path("truncated_jpeg"))
    assert status == 200 and int(headers["Content-Length"]) == len(body)
    assert body.startswith(b"\xff\xd8") and not body.endswith(b"\xff\xd9")
    assert not decodes(body)


def check_html_as_image(server):
    status, headers, body = request(server, corner_path("html_as_image"))
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert body.lstrip().lower().startswith(b"<!doctype html") and not decodes(body)


def follow(server, path: str, hops: int):
    """The (status, path) of each response, following up to `hops` redirects by hand."""
    seen = []
    for _ in range(hops + 1):
        status, headers, body = request(server, path)
        seen.append((status, path))
        if status not in (301, 302, 303, 307, 308):
            return seen, body
        location = urlsplit(headers["Location"])
        assert location.hostname in (None, server.host)
        path = location.path
    return seen, None


def check_redirect_chain(server):
    seen, body = follow(server, corner_path("redirect_chain"), hops=10)
    assert [status for status, _ in seen] == [302, 301, 307, 200]
    assert decodes(body)


def check_redirect_loop(server):
    seen, body = follow(server, corner_path("redirect_loop"), hops=10)
    assert body is None and all(status == 302 for status, _ in seen)
    assert len({path for _, path in seen}) == 2


def check_noai(server):
    status, headers, body = request(server, corner_path("noai"))
    assert status == 200 and decodes(body)
    assert "noai" in headers["X-Robots-Tag"]


def check_link_local_redirect(server, corner_rows):
    status, headers, _ = request(server, corner_path("link_local_redirect"))
    assert status == 302
    location = urlsplit(headers["Location"])
    row = corner_rows["link_local_redirect"]
    assert location.hostname == row["resolve_host"] == "metadata.sandbox.invalid"
    assert row["resolve_addr"] == "169.254.169.254"
    assert ipaddress.ip_address(row["resolve_addr"]).is_link_local


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def test_every_corner_case_has_a_check():
    assert set(CHECKS) == {case.case for case in CORNER_CASES}


@pytest.mark.parametrize("case", [c.case for c in CORNER_CASES])
def test_corner_case_behaves_as_listed(case, world, server):
    corner_rows = {row["case"]: row for row in rows(world, "corner")}
    assert corner_rows[case]["url"] == server.url + corner_path(case)
    if case == "link_local_redirect":
        CHECKS[case](server, corner_rows)
    else:
        CHECKS[case](server)


def test_stop_returns_while_slow_and_huge_bodies_are_in_flight(world):
    spare = SandboxServer(world, port=0).start()
    streams = [open_stream(spare, corner_path(case)) for case in ("slow_drip", "huge_body", "huge_body_unannounced")]
    stopper = threading.Thread(target=spare.stop, daemon=True)
    stopper.start()
    stopper.join(120)  # bounds a hang (the bodies would take minutes, 2 GiB), no speed assertion
    assert not stopper.is_alive()
    # stop() ended the bodies rather than waiting them out: each came back short
    for connection, response in streams:
        total = int(response.getheader("Content-Length") or HUGE_BODY_BYTES)
        try:
            received = len(response.read())
        except http.client.IncompleteRead as short:
            received = len(short.partial)
        finally:
            connection.close()
        assert received < total


def test_server_refuses_to_start_without_a_world(tmp_path):
    with pytest.raises(FileNotFoundError, match="sandbox make"):
        SandboxServer(tmp_path)


def test_ground_truth_files_are_not_served(world, server):
    assert pq.read_table(world / "ground_truth" / "images.parquet").num_rows > 0
    assert request(server, "/ground_truth/images.parquet")[0] == 404
