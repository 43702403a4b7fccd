"""Image hosts with a temper, on 127.0.0.1, for politeness tests and benchmarks.

`TestHost` serves files from a web root (the sandbox world's) or one fixed image at every
path, and can be told to behave like the hosts a polite downloader meets:
- a capacity: a token bucket of `capacity` requests/s (`burst` deep); a request beyond it gets
  429 with Retry-After, and latency grows with the load (base_latency x (1 + 3 x load^2), load
  being the recent request rate over the capacity), as a server nearing saturation does;
- an outage: from its `outage_after`-th request on, 503 with Retry-After (or `outage_status`)
  for `outage_s` seconds, then it recovers;
- a robots.txt: a text, a status (404, 500, ...), a redirect, slow (after `robots_delay_s`) or huge;
- /opt-out/...: 200 with `X-Robots-Tag: noai` (or `opt_out_headers`) and a body of
  OPT_OUT_BODY_BYTES sent slowly, counting what actually left, so a test can tell the body was
  not read;
- opt-outs of the other conventions (sandbox/consent.py lays out a host for each): `headers` on
  every image (Content-Usage, tdm-reservation), and a `/.well-known/tdmrep.json` (`tdmrep` text,
  else `tdmrep_status`), each site-wide file's requests recorded apart from the images'.
Everything it did is counted in `stats` (per status, peak concurrency), `robots_requests`, and
`first_ok_at`/`last_ok_at`, so a benchmark measures the rate the host itself saw.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

OPT_OUT_BODY_BYTES = 64 * 2**20
OPT_OUT_CHUNK = 64 * 1024


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # many fetching threads connect at once

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # a client hanging up is no error here


class TestHost:
    __test__ = False  # not a pytest test class

    def __init__(self, root: str | Path | None = None, image: bytes | None = None, *,
                 capacity: float | None = None, burst: float | None = None, retry_after: str = "1",
                 base_latency: float = 0.0, outage_after: int | None = None, outage_s: float = 0.0,
                 outage_status: int = 503,
                 robots: str | None = None, robots_status: int = 404, robots_delay_s: float = 0.0,
                 robots_location: str | None = None, headers: dict | None = None,
                 opt_out_headers: dict | None = None, tdmrep: str | None = None, tdmrep_status: int = 404,
                 host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root).resolve() if root is not None else None
        self.image = image
        self.capacity, self.burst = capacity, burst if burst is not None else (capacity or 0)
        self.retry_after = retry_after
        self.base_latency = base_latency
        self.outage_after, self.outage_s, self.outage_status = outage_after, outage_s, outage_status
        self.robots, self.robots_status, self.robots_delay_s = robots, robots_status, robots_delay_s
        self.robots_location = robots_location
        self.headers = dict(headers or {})
        self.opt_out_headers = dict(opt_out_headers or {"X-Robots-Tag": "noai"})
        self.tdmrep, self.tdmrep_status = tdmrep, tdmrep_status
        self.tdmrep_requests: list[dict] = []
        self.stats: Counter = Counter()
        self.opt_out_sent = 0  # body bytes of /opt-out/ responses that left this server
        self.first_ok_at = self.last_ok_at = 0.0  # monotonic times of the first and last 200
        self.robots_requests: list[dict] = []
        self.request_times: list[float] = []  # monotonic arrival of each image request
        self._lock = threading.Lock()
        self._tokens = float(self.burst)
        self._refilled = time.monotonic()
        self._load = 0.0  # requests/s lately (decayed over a second)
        self._load_at = time.monotonic()
        self._outage_until: float | None = None
        self._in_flight = 0
        self._requests = 0
        self.stopping = threading.Event()
        self._httpd = _Server((host, port), self._handler())
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> "TestHost":
        if self._thread is not None:  # `with Case.start(...)` enters a started host: a second loop would never stop
            return self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="test-host", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "TestHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- decisions
    def _admit(self) -> tuple[int, float]:
        """(status, latency) for an image request arriving now."""
        with self._lock:
            now = time.monotonic()
            self._requests += 1
            self._load = self._load * pow(2.718281828, -(now - self._load_at)) + 1.0
            self._load_at = now
            if self.outage_after is not None and self._requests > self.outage_after:
                if self._outage_until is None:
                    self._outage_until = now + self.outage_s
                if now < self._outage_until:
                    return self.outage_status, 0.0
            if self.capacity:
                self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.capacity)
                self._refilled = now
                if self._tokens < 1:
                    return 429, 0.0
                self._tokens -= 1
                load = min(self._load / self.capacity, 2.0)
                return 200, self.base_latency * (1 + 3 * load * load)
            return 200, self.base_latency

    def _handler(self):
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    self._get(urlsplit(self.path).path)
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    self.close_connection = True

            def _send(self, status: int, body: bytes, content_type: str = "image/jpeg", extra=None, **headers):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _get(self, path: str):
                if path == "/robots.txt":
                    return self._robots()
                if path == "/.well-known/tdmrep.json":
                    with host._lock:
                        host.tdmrep_requests.append(dict(self.headers))
                    if host.tdmrep is not None:
                        return self._send(200, host.tdmrep.encode(), "application/json")
                    return self._send(host.tdmrep_status, b"tdmrep\n", "text/plain")
                if path.startswith("/opt-out/"):
                    return self._opt_out()
                status, latency = host._admit()
                with host._lock:
                    host.request_times.append(time.monotonic())
                    host.stats[status] += 1
                    host._in_flight += 1
                    host.stats["peak_in_flight"] = max(host.stats["peak_in_flight"], host._in_flight)
                try:
                    if latency:
                        time.sleep(latency)
                    if status != 200:
                        return self._send(status, b"busy\n", "text/plain", Retry_After=host.retry_after)
                    body = host._body(path)
                    if body is None:
                        with host._lock:
                            host.stats[200] -= 1
                            host.stats[404] += 1
                        return self._send(404, b"missing\n", "text/plain")
                    self._send(200, body, extra=host.headers)
                    with host._lock:
                        host.last_ok_at = time.monotonic()
                        host.first_ok_at = host.first_ok_at or host.last_ok_at
                finally:
                    with host._lock:
                        host._in_flight -= 1

            def _robots(self):
                with host._lock:
                    host.robots_requests.append(dict(self.headers))
                if host.robots_delay_s and host.stopping.wait(host.robots_delay_s):
                    return
                if host.robots_location is not None:
                    return self._send(302, b"moved\n", "text/plain", Location=host.robots_location)
                if host.robots is not None:
                    return self._send(200, host.robots.encode(), "text/plain")
                self._send(host.robots_status, b"robots\n", "text/plain")

            def _opt_out(self):
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(OPT_OUT_BODY_BYTES))
                for name, value in host.opt_out_headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.flush()
                chunk = b"\xff" * OPT_OUT_CHUNK
                for _ in range(OPT_OUT_BODY_BYTES // OPT_OUT_CHUNK):
                    if host.stopping.is_set():
                        break
                    self.wfile.write(chunk)
                    with host._lock:
                        host.opt_out_sent += len(chunk)
                    time.sleep(0.001)
                self.close_connection = True

        return Handler

    def _body(self, path: str) -> bytes | None:
        if self.image is not None:
            return self.image
        candidate = (self.root / path.lstrip("/")).resolve()
        if candidate.is_file() and candidate.is_relative_to(self.root):
            return candidate.read_bytes()
        return None
