"""The CLIP and embed tests' world: a sandbox web downloaded once per session by the real
download stage, into image shards every test copies into a store of its own.

The world is bigger than the download tests' one so precision and recall are measured on a
few hundred pairs; its captions carry their real languages (en, fr, ..., none).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from clipfleet.producer.fleet import free_port
from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared import layout
from clipfleet.shared.pipeline import execute
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from clipfleet.workers.download.politeness import DomainLimiter
from clipfleet.workers.download.stage import DownloadStage, domain_limits
from tests.conftest import redis_server

WORLD_SAMPLES = 320
SHARD_SIZE = 160
SHARDS = (0, 1)
SHAPES = {"filter_model": "shapes", "multilingual_filter_model": "shapes", "embed_model": "shapes"}


@dataclass
class Downloaded:
    """Image shards of the sandbox world and the truth about each image (by URL)."""
    store_uri: str
    truth: dict[str, dict]
    world: Path

    def rows(self, shard: int) -> list[dict]:
        return pq.read_table(io.BytesIO(Store(self.store_uri).read_bytes(layout.image_shard(shard, "parquet")))
                             ).to_pylist()


@pytest.fixture(scope="session")
def session_redis(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def downloaded(tmp_path_factory, session_redis) -> Downloaded:
    return download_world(tmp_path_factory, session_redis, "clip-world", samples=WORLD_SAMPLES, seed=21,
                          resize_mode="keep_ratio")


ASPECT_SAMPLES = 480
ASPECT_SHARD_SIZE = 160
ASPECT_SHARDS = (0, 1, 2)


@pytest.fixture(scope="session")
def letterboxed(tmp_path_factory, session_redis) -> Downloaded:
    """A world of aspect ratios from 1:2 to 2.5:1 with 30% wrong captions, stored in img2dataset's
    default `border` mode: a wide image is a strip inside a white square."""
    return download_world(tmp_path_factory, session_redis, "aspect-world", samples=ASPECT_SAMPLES, seed=5,
                          resize_mode="border", shard_size=ASPECT_SHARD_SIZE, wrong_caption_share=0.3,
                          aspects=(0.5, 2.5))


def download_world(tmp_path_factory, redis_url: str, name: str, samples: int, seed: int, resize_mode: str,
                   shard_size: int = SHARD_SIZE, **world) -> Downloaded:
    """A sandbox world (`world`: make_sandbox's options) downloaded by the real download stage into
    image shards of `shard_size`, stored as `resize_mode` says."""
    world_dir = tmp_path_factory.mktemp(name)
    make_sandbox(world_dir, samples=samples, port=free_port(), seed=seed, wat_files=1, **world)
    truth = pq.read_table(world_dir / "ground_truth" / "images.parquet").to_pylist()
    store_uri = str(tmp_path_factory.mktemp(f"{name}-downloaded") / "store")
    store = Store(store_uri)
    cfg = RunConfig.make(store=store_uri, input_kind="urls", until="download", allow_private_addresses=True,
                         download_timeout=10.0, resize_mode=resize_mode, domain_max_concurrency=64,
                         domain_max_rate=0.0, shard_size=shard_size)
    cfg.save(store)
    with SandboxServer(world_dir):
        stage = DownloadStage(cfg, limiter=DomainLimiter(redis.Redis.from_url(redis_url), domain_limits(cfg.download)))
        for shard in range(-(-len(truth) // shard_size)):
            part = truth[shard * shard_size:(shard + 1) * shard_size]
            buf = io.BytesIO()
            pq.write_table(pa.table({
                "url": [r["url"] for r in part], "caption": [r["caption"] for r in part],
                "page_url": [None] * len(part), "language": [r["language"] for r in part],
                "language_score": pa.array([1.0] * len(part), pa.float32()),
                "uid": [f"uid-{r['id']}" for r in part]}, schema=layout.URL_SHARD_SCHEMA), buf)
            store.write_bytes(layout.url_shard(shard), buf.getvalue())
            marker = execute(stage, store, shard)
            assert marker["stats"]["success"] == len(part), marker["stats"]
    return Downloaded(store_uri, {r["url"]: r for r in truth}, world_dir)


def copy_images(downloaded: Downloaded, store_uri: str, shards=SHARDS) -> Store:
    """A store holding the downloaded image shards (the download stage's outputs and markers)."""
    source, target = Store(downloaded.store_uri), Store(store_uri)
    for shard in shards:
        for ext in ("tar", "parquet", "stats"):
            rel = layout.image_shard(shard, ext)
            target.write_bytes(rel, source.read_bytes(rel))
    return target


def clip_run(store_uri: str, until: str = "clip", **options) -> RunConfig:
    """A saved run config for the CLIP (and embed) stages on the sandbox, `shapes` everywhere;
    resize_mode is how the images were stored (keep_ratio, as `downloaded` stores them, unless given)."""
    cfg = RunConfig.make(store=store_uri, input_kind="urls", until=until, shard_size=SHARD_SIZE,
                         **{"resize_mode": "keep_ratio", **SHAPES, **options})
    cfg.save(Store(store_uri))
    return cfg
