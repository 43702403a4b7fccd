"""A run store built the way a run builds it, for the report, plan and dataset-use tests.

Every stage is the real one, run in this process through the framework (`execute`, so markers
are real), on a sandbox web served on loopback, with the shipped `shapes` CLIP as filter and
embedding model and its heads for the tags; the index's run-once train and merge tasks run when
they are due, as the fleet runs them.
"""
from __future__ import annotations

import json
from pathlib import Path

from clipfleet.shared.pipeline import Stage, execute
from clipfleet.workers.registry import REGISTRY
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from tests.conftest import redis_server
from tests.workers.index.conftest import drive as drive_index

SHARD_SIZE = 60


def run_config(store_uri: str, wat: str, **options) -> RunConfig:
    settings = {"inputs": [wat], "input_kind": "wat", "until": "index", "shard_size": SHARD_SIZE,
                "allow_private_addresses": True, "download_timeout": 4.0, "download_retries": 0,
                "domain_max_concurrency": 64, "domain_max_rate": 0.0,
                "filter_model": "shapes", "multilingual_filter_model": "shapes", "embed_model": "shapes",
                "index_text": True, **options}
    return RunConfig.make(store=store_uri, **settings)


def build_run_store(store_uri: str, world: Path, workdir: Path, stop_after: str = "index") -> dict:
    """Run extract -> download -> clip -> embed -> tag -> index over the world's first WAT into `store_uri`.
    Returns {"shards": url shard ids, "real": the stages that ran}."""
    import redis

    from clipfleet.sandbox.server import SandboxServer
    from clipfleet.workers.download.politeness import DomainLimiter
    from clipfleet.workers.download.stage import DownloadStage, domain_limits
    from clipfleet.workers.extract.stage import ExtractStage

    settings = json.loads((world / "sandbox.json").read_text())
    wat = str(world / "wat" / sorted(settings["wat_files"])[0])
    store = Store(store_uri)
    cfg = run_config(store.uri, wat)
    cfg.save(store)
    real = ["extract", "download"]
    with redis_server(workdir) as url:
        client = redis.Redis.from_url(url)
        shards = execute(ExtractStage(cfg, redis_client=client), store, 0, wat=wat)["next_shards"]
        download = DownloadStage(cfg, limiter=DomainLimiter(client, domain_limits(cfg.download)))
        with SandboxServer(world):
            for shard in shards:
                execute(download, store, shard)
    if stop_after == "download":
        return {"shards": shards, "real": real}
    for name in ("clip", "embed", "tag"):
        stage = _real_stage(name, cfg)
        real.append(name)
        for shard in shards:
            execute(stage, store, shard)
        if name == stop_after:
            return {"shards": shards, "real": real}
    drive_index(store, shards)  # as the fleet drives it: partials, then train and merge when due
    real.append("index")
    return {"shards": shards, "real": real}




def _real_stage(name: str, cfg: RunConfig) -> Stage:
    """The stage class registered for `name`, built for `cfg`."""
    return REGISTRY[name].stage_class()(cfg)


# -- fixtures (tests/producer/conftest.py and tests/e2e import these) -----------------------------
import pytest  # noqa: E402

WORLD_SAMPLES = 200


@pytest.fixture(scope="session")
def report_world(tmp_path_factory):
    from clipfleet.producer.fleet import free_port
    from clipfleet.sandbox.web import make_sandbox
    directory = tmp_path_factory.mktemp("report-world")
    make_sandbox(directory, samples=WORLD_SAMPLES, port=free_port(), seed=5, wat_files=1)
    return directory


@pytest.fixture(scope="session")
def built_run(tmp_path_factory, report_world):
    """(store directory, {"shards", "real"}) of a run taken through index."""
    work = tmp_path_factory.mktemp("report-run")
    info = build_run_store(str(work / "store"), report_world, work)
    return work / "store", info


@pytest.fixture
def run_copy(built_run, tmp_path):
    """A copy of the built run for one test to change."""
    import shutil
    target = tmp_path / "store"
    shutil.copytree(built_run[0], target)
    return target
