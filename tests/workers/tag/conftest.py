"""The tagging tests' world: a sandbox web, and one shard of it taken through the real download,
CLIP filter and embed stages (`shapes` everywhere), which every test copies and tags.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from clipfleet.producer.fleet import free_port
from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared import layout
from clipfleet.shared.models import load_clip
from clipfleet.shared.pipeline import execute
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from clipfleet.workers.download.politeness import DomainLimiter
from clipfleet.workers.clip.stage import ClipStage
from clipfleet.workers.download.stage import DownloadStage, domain_limits
from clipfleet.workers.embed.stage import EmbedStage

WORLD_SAMPLES = 260
SHARD = 0


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tag-world")
    make_sandbox(directory, samples=WORLD_SAMPLES, port=free_port(), seed=21, wat_files=1)
    return directory


@pytest.fixture(scope="session")
def truth(world) -> dict[str, dict]:
    """Ground truth by URL."""
    return {row["url"]: row for row in pq.read_table(world / "ground_truth" / "images.parquet").to_pylist()}


@pytest.fixture(scope="session")
def shapes():
    return load_clip("shapes")


def run_config(store_uri: str, **options) -> RunConfig:
    # keep_ratio, as the sandbox's other runs: shapes sees 64 px, and img2dataset's default
    # border padding would leave a 16:9 picture 36 px tall in that.
    settings = {"input_kind": "urls", "until": "tag", "embed_model": "shapes", "resize_mode": "keep_ratio",
                "filter_model": "shapes", "multilingual_filter_model": "shapes",
                "allow_private_addresses": True, "download_timeout": 4.0,
                "domain_max_concurrency": 64, "domain_max_rate": 0.0, **options}
    return RunConfig.make(store=store_uri, **settings)


def _download(store: Store, world, truth, redis_url: str) -> None:
    rows = list(truth.values())
    urls = pa.table({"url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows],
                     "page_url": [None] * len(rows), "language": [r["language"] for r in rows],
                     "language_score": pa.array([1.0] * len(rows), pa.float32()),
                     "uid": [str(r["id"]) for r in rows]})
    buf = io.BytesIO()
    pq.write_table(urls, buf)
    store.write_bytes(layout.url_shard(SHARD), buf.getvalue())
    cfg = run_config(store.uri)
    limiter = DomainLimiter(redis.Redis.from_url(redis_url), domain_limits(cfg.download))
    with SandboxServer(world):
        execute(DownloadStage(cfg, limiter=limiter), store, SHARD)


@pytest.fixture(scope="session")
def embedded_store(tmp_path_factory, world, truth):
    """A store with shard 0 downloaded and embedded; tests copy it before tagging."""
    import subprocess

    from clipfleet.producer.fleet import _wait_for, check_broker, find_redis_server
    directory = tmp_path_factory.mktemp("embedded") / "store"
    store = Store(str(directory))
    port = free_port()
    proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(directory.parent)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for(lambda: check_broker(url, 0.5) is None, "redis-server", 20, proc)
        _download(store, world, truth, url)
    finally:
        proc.terminate()
        proc.wait(10)
    cfg = run_config(store.uri)
    for stage in (ClipStage(cfg), EmbedStage(cfg)):
        execute(stage, store, SHARD)
    return directory


@pytest.fixture
def store(embedded_store, tmp_path) -> Store:
    """A fresh copy of the embedded store, for one test to tag."""
    import shutil
    target = tmp_path / "store"
    shutil.copytree(embedded_store, target)
    return Store(str(target))
