"""The sandbox web server: serves DIR/web over HTTP, plus a misbehaving corner.

`SandboxServer` runs a ThreadingHTTPServer in a background thread, so tests can start it
in-process; `clipfleet sandbox serve DIR` runs the same class in the foreground.
Each misbehaving case lives at its own path under /corner/ and is listed in CORNER_CASES,
which is also what `make` writes to DIR/ground_truth/corner.parquet.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

# The corner's files, written by `make` under DIR/web/corner/.
CORNER_OK_IMAGE = "corner/ok.jpg"
CORNER_TRUNCATED_IMAGE = "corner/truncated.jpg"
CORNER_BOMB_IMAGE = "corner/bomb.png"

# A host name under .invalid never resolves in real DNS; tests map it to this address
# through their own resolver, and the downloader must refuse it before connecting.
METADATA_HOST = "metadata.sandbox.invalid"
METADATA_ADDRESS = "169.254.169.254"
METADATA_URL = f"http://{METADATA_HOST}/latest/meta-data/"

DRIP_BYTES = 4  # per DRIP_INTERVAL_S: eight bytes a second
DRIP_INTERVAL_S = 0.5
HUGE_BODY_BYTES = 2 * 1024 ** 3  # far beyond any sane image limit
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class CornerCase:
    case: str
    path: str
    expected_status: str  # "success" or "failed": what a correct downloader reports
    expected_error: str  # a keyword its error message should contain ("" on success)
    note: str
    resolve_host: str = ""
    resolve_addr: str = ""


CORNER_CASES = [
    CornerCase("ok", "/corner/ok.jpg", "success", "", "a plain 200 with a JPEG; the control case"),
    CornerCase("not_found", "/corner/missing.jpg", "failed", "404", "404 Not Found"),
    CornerCase("server_error_then_ok", "/corner/flaky.jpg", "success", "",
               "500 on the 1st, 3rd, 5th... request, 200 with a JPEG on the others: "
               "one retry succeeds"),
    CornerCase("rate_limited", "/corner/rate-limited.jpg", "success", "",
               "429 with Retry-After: 1 on the 1st, 3rd, 5th... request, 200 on the others: "
               "retry after waiting"),
    CornerCase("slow_drip", "/corner/slow-drip.jpg", "failed", "timeout",
               f"200 with an honest Content-Length, then {DRIP_BYTES} bytes every "
               f"{DRIP_INTERVAL_S}s: a whole-request deadline must end it"),
    CornerCase("larger_than_announced", "/corner/larger-than-announced.jpg", "failed", "decode",
               "Content-Length announces a third of the JPEG, the whole JPEG follows: "
               "a reader that honours Content-Length gets a truncated image"),
    CornerCase("huge_body", "/corner/huge.jpg", "failed", "too large",
               "Content-Length: 2 GiB, streams a JPEG marker then zeros"),
    CornerCase("huge_body_unannounced", "/corner/huge-unannounced.jpg", "failed", "too large",
               "no Content-Length, streams up to 2 GiB until the connection closes: "
               "the size limit must hold while reading"),
    CornerCase("decompression_bomb", "/corner/bomb.png", "failed", "pixels",
               "a ~50 KB PNG of 20000 x 20000 pixels (400 million)"),
    CornerCase("truncated_jpeg", "/corner/truncated.jpg", "failed", "decode",
               "the first 60% of a JPEG, with a matching Content-Length"),
    CornerCase("html_as_image", "/corner/not-an-image.jpg", "failed", "not an image",
               "an HTML page served as Content-Type: image/jpeg"),
    CornerCase("redirect_chain", "/corner/redirect-chain.jpg", "success", "",
               "302 -> 301 -> 307 (absolute, then root-relative Locations), then a JPEG"),
    CornerCase("redirect_loop", "/corner/redirect-loop.jpg", "failed", "redirect",
               "302 to /corner/redirect-loop/b.jpg, which 302s back, forever"),
    CornerCase("noai", "/corner/noai.jpg", "failed", "noai",
               "200 with a JPEG and X-Robots-Tag: noai, noimageai: must be skipped"),
    CornerCase("link_local_redirect", "/corner/metadata-redirect.jpg", "failed",
               "private address",
               f"302 to {METADATA_URL}; {METADATA_HOST} resolves (through the test's resolver) "
               f"to {METADATA_ADDRESS}: refuse before connecting",
               resolve_host=METADATA_HOST, resolve_addr=METADATA_ADDRESS),
]

_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
                  ".webp": "image/webp", ".html": "text/html; charset=utf-8",
                  ".json": "application/json", ".parquet": "application/octet-stream"}

_NOT_AN_IMAGE = (b"<!DOCTYPE html><html><head><title>Access denied</title></head>"
                 b"<body><h1>Please enable cookies</h1><p>This page is not an image.</p>"
                 b"</body></html>")


def read_settings(directory: str | Path) -> dict:
    """DIR/sandbox.json, as written by `clipfleet sandbox make`."""
    path = Path(directory) / "sandbox.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `clipfleet sandbox make {directory}` first")
    return json.loads(path.read_text())


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a client stuck on the slow drip must not block shutdown

    def __init__(self, address, web_root: Path, quiet: bool):
        self.web_root = web_root.resolve()
        self.quiet = quiet
        self.stopping = threading.Event()
        self._request_counts: dict[str, int] = {}
        self._count_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):
        # A client that hangs up (a download cut at its deadline, a body refused for X-Robots-Tag)
        # is part of what this server is for: no traceback in the middle of a run's progress bars.
        import sys
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) or self.quiet:
            return
        super().handle_error(request, client_address)

    def count_request(self, path: str) -> int:
        """How many requests this path had before this one (0 for the first)."""
        with self._count_lock:
            seen = self._request_counts.get(path, 0)
            self._request_counts[path] = seen + 1
            return seen

    def reset_counts(self) -> None:
        with self._count_lock:
            self._request_counts.clear()

    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real web server
    timeout = 30  # a silent client cannot hold a thread forever
    server: _HTTPServer

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if not self.server.quiet:
            super().log_message(format, *args)

    def do_GET(self):
        self._dispatch(head=False)

    def do_HEAD(self):
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        path = urlsplit(self.path).path
        corner = _CORNER_HANDLERS.get(path)
        try:
            if corner is not None:
                corner(self, head)
            elif path == "/":
                self._send(200, _index_page(), "text/html; charset=utf-8", head=head)
            else:
                self._send_file(path, head)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client gave up; nothing more to do

    # -- plain responses

    def _send(self, status: int, body: bytes, content_type: str, head: bool = False,
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_status(self, status: int, head: bool, headers: dict | None = None) -> None:
        body = f"{status} {self.responses.get(status, ('',))[0]}\n".encode()
        self._send(status, body, "text/plain; charset=utf-8", head, headers)

    def _redirect(self, status: int, location: str, head: bool) -> None:
        self._send_status(status, head, {"Location": location})

    def _web_file(self, relative: str) -> Path | None:
        """A file under the web root, or None; never a path outside it."""
        candidate = (self.server.web_root / relative.lstrip("/")).resolve()
        if candidate.is_file() and candidate.is_relative_to(self.server.web_root):
            return candidate
        return None

    def _send_file(self, path: str, head: bool, headers: dict | None = None) -> None:
        file = self._web_file(path)
        if file is None:
            self._send_status(404, head)
            return
        content_type = _CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream")
        self._send(200, file.read_bytes(), content_type, head, headers)

    def _ok_image(self) -> bytes:
        return self._web_file(CORNER_OK_IMAGE).read_bytes()

    # -- the misbehaving corner

    def _not_found(self, head):
        self._send_status(404, head)

    def _flaky(self, head):
        if self.server.count_request("/corner/flaky.jpg") % 2 == 0:
            self._send_status(500, head)
        else:
            self._send_file(CORNER_OK_IMAGE, head)

    def _rate_limited(self, head):
        if self.server.count_request("/corner/rate-limited.jpg") % 2 == 0:
            self._send_status(429, head, {"Retry-After": "1"})
        else:
            self._send_file(CORNER_OK_IMAGE, head)

    def _slow_drip(self, head):
        body = self._ok_image()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        for start in range(0, len(body), DRIP_BYTES):
            self.wfile.write(body[start:start + DRIP_BYTES])
            self.wfile.flush()
            if self.server.stopping.wait(DRIP_INTERVAL_S):
                break
        self.close_connection = True

    def _larger_than_announced(self, head):
        body = self._ok_image()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body) // 3))
        self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.close_connection = True  # the extra bytes would poison a kept-alive connection

    def _stream_zeros(self, total: int) -> None:
        self.wfile.write(b"\xff\xd8\xff\xe0")  # looks like the start of a JPEG
        zeros = bytes(CHUNK_BYTES)
        sent = 4
        while sent < total and not self.server.stopping.is_set():
            chunk = zeros[:min(CHUNK_BYTES, total - sent)]
            self.wfile.write(chunk)
            sent += len(chunk)

    def _huge_body(self, head):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(HUGE_BODY_BYTES))
        self.end_headers()
        if not head:
            self._stream_zeros(HUGE_BODY_BYTES)
        self.close_connection = True

    def _huge_body_unannounced(self, head):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        if not head:
            self._stream_zeros(HUGE_BODY_BYTES)
        self.close_connection = True

    def _bomb(self, head):
        self._send_file(CORNER_BOMB_IMAGE, head)

    def _truncated(self, head):
        self._send_file(CORNER_TRUNCATED_IMAGE, head)

    def _html_as_image(self, head):
        self._send(200, _NOT_AN_IMAGE, "image/jpeg", head)

    def _redirect_chain_start(self, head):
        self._redirect(302, f"{self.server.base_url()}/corner/redirect-chain/1.jpg", head)

    def _redirect_chain_1(self, head):
        self._redirect(301, "/corner/redirect-chain/2.jpg", head)

    def _redirect_chain_2(self, head):
        self._redirect(307, "/corner/redirect-chain/3.jpg", head)

    def _redirect_chain_end(self, head):
        self._send_file(CORNER_OK_IMAGE, head)

    def _redirect_loop_a(self, head):
        self._redirect(302, "/corner/redirect-loop/b.jpg", head)

    def _redirect_loop_b(self, head):
        self._redirect(302, f"{self.server.base_url()}/corner/redirect-loop.jpg", head)

    def _noai(self, head):
        self._send_file(CORNER_OK_IMAGE, head, {"X-Robots-Tag": "noai, noimageai"})

    def _metadata_redirect(self, head):
        self._redirect(302, METADATA_URL, head)


_CORNER_HANDLERS = {
    "/corner/missing.jpg": _Handler._not_found,
    "/corner/flaky.jpg": _Handler._flaky,
    "/corner/rate-limited.jpg": _Handler._rate_limited,
    "/corner/slow-drip.jpg": _Handler._slow_drip,
    "/corner/larger-than-announced.jpg": _Handler._larger_than_announced,
    "/corner/huge.jpg": _Handler._huge_body,
    "/corner/huge-unannounced.jpg": _Handler._huge_body_unannounced,
    "/corner/bomb.png": _Handler._bomb,
    "/corner/truncated.jpg": _Handler._truncated,
    "/corner/not-an-image.jpg": _Handler._html_as_image,
    "/corner/redirect-chain.jpg": _Handler._redirect_chain_start,
    "/corner/redirect-chain/1.jpg": _Handler._redirect_chain_1,
    "/corner/redirect-chain/2.jpg": _Handler._redirect_chain_2,
    "/corner/redirect-chain/3.jpg": _Handler._redirect_chain_end,
    "/corner/redirect-loop.jpg": _Handler._redirect_loop_a,
    "/corner/redirect-loop/b.jpg": _Handler._redirect_loop_b,
    "/corner/noai.jpg": _Handler._noai,
    "/corner/metadata-redirect.jpg": _Handler._metadata_redirect,
}


def _index_page() -> bytes:
    items = "".join(f'<li><a href="{c.path}">{c.case}</a>: {c.note}</li>' for c in CORNER_CASES)
    return (f"<!DOCTYPE html><html><head><title>clipfleet sandbox web</title></head><body>"
            f"<h1>clipfleet sandbox web</h1><p>Images are under /img/. "
            f"The misbehaving corner:</p><ul>{items}</ul></body></html>").encode()


class SandboxServer:
    """Serve a sandbox directory on 127.0.0.1 from a background thread.

    >>> with SandboxServer("world") as server:
    ...     fetch(server.url + "/img/000000.jpg")

    `port=None` takes the port baked into DIR/sandbox.json (the one the WAT files and
    ground truth use); `port=0` takes any free port.
    """

    def __init__(self, directory: str | Path, host: str = "127.0.0.1", port: int | None = None,
                 quiet: bool = True):
        self.directory = Path(directory)
        self.host = host
        self.port = read_settings(directory)["port"] if port is None else port
        self.quiet = quiet
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "SandboxServer":
        self._httpd = _HTTPServer((self.host, self.port), self.directory / "web", self.quiet)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="sandbox-web",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.stopping.set()  # ends drips and huge bodies in flight
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None

    def reset_counts(self) -> None:
        """Make the flaky and rate-limited paths fail again on their next request."""
        self._httpd.reset_counts()

    def __enter__(self) -> "SandboxServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
