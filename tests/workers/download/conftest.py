"""The download tests' world: a sandbox web on loopback, a recording server, URL shards.

Every test here runs with a guard that fails any connection outside 127.0.0.0/8 made from
the test process (fleet tests start workers that only ever get loopback URLs).
"""
from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from clipfleet.producer.fleet import free_port
from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from clipfleet.workers.download.stage import DownloadStage, domain_limits
from clipfleet.workers.download.politeness import DomainLimiter

WORLD_SAMPLES = 40


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("world")
    make_sandbox(directory, samples=WORLD_SAMPLES, port=free_port(), seed=3, wat_files=1)
    return directory


@pytest.fixture(scope="session")
def sandbox(world):
    with SandboxServer(world) as server:
        yield server


@pytest.fixture(scope="session")
def truth(world) -> pa.Table:
    return pq.read_table(world / "ground_truth" / "images.parquet")


@pytest.fixture(scope="session")
def corner(world) -> list[dict]:
    return pq.read_table(world / "ground_truth" / "corner.parquet").to_pylist()


def url_table(urls: list[str], captions: list[str] | None = None) -> pa.Table:
    """A URL shard with the extract stage's columns."""
    n = len(urls)
    return pa.table({"url": urls, "caption": captions or [f"caption {i}" for i in range(n)],
                     "page_url": [None] * n, "language": ["en"] * n,
                     "language_score": pa.array([1.0] * n, pa.float32()),
                     "uid": [f"uid-{i}" for i in range(n)]})


def write_url_shard(store: Store, shard: int, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(f"urls/{shard:05d}.parquet", buf.getvalue())


def make_run(store_uri: str, **options) -> RunConfig:
    """A saved run config for the sandbox: loopback allowed, generous per-host limits."""
    settings = {"input_kind": "urls", "until": "download", "allow_private_addresses": True,
                "download_timeout": 4.0, "domain_max_concurrency": 64, "domain_max_rate": 0.0,
                **options}
    cfg = RunConfig.make(store=store_uri, **settings)
    cfg.save(Store(store_uri))
    return cfg


def make_stage(cfg: RunConfig, redis_url: str, **hooks) -> DownloadStage:
    limiter = DomainLimiter(redis.Redis.from_url(redis_url), domain_limits(cfg.download))
    return DownloadStage(cfg, limiter=limiter, **hooks)


class RecordingHandler(BaseHTTPRequestHandler):
    """Serves a few header cases and records every request it gets."""

    protocol_version = "HTTP/1.1"
    image = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path, _, query = self.path.partition("?")
        headers, status, body = {}, 200, self.image
        if path in ("/robots.txt", "/.well-known/tdmrep.json"):  # none: everything allowed; counted apart
            self.server.robots_requests.append((self.path, dict(self.headers)))
            status, body = 404, b"no such file"
        else:
            self.server.requests.append((self.path, dict(self.headers)))
        if path == "/robots-tag":
            headers["X-Robots-Tag"] = query.replace("%20", " ").replace("%3A", ":")
        elif path == "/missing":
            status, body = 404, b"missing"
        elif path == "/unavailable":
            status, body = 503, b"busy"
            headers["Retry-After"] = "1"
        elif path == "/overloaded":
            status, body = 500, b"oops"
        elif path == "/retry-much-later":
            status, body = 429, b"slow down"
            headers["Retry-After"] = "3600"
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def recording_server(world):
    """A loopback server recording (path, headers) of each request; serves the corner's JPEG."""
    handler = type("Handler", (RecordingHandler,), {"image": (world / "web/corner/ok.jpg").read_bytes()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.requests = []
    server.robots_requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
