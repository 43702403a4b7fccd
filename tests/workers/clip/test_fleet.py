"""Real processes: a gpu-clip worker whose pool process is SIGKILLed mid-shard, and
`clipfleet run --urls ... --until embed` through download, clip and embed workers."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.producer.fleet import Fleet, state_dir
from clipfleet.sandbox.server import SandboxServer
from clipfleet.shared import layout
from clipfleet.shared.pipeline import execute
from clipfleet.shared.storage import Store
from clipfleet.workers.app import make_app
from clipfleet.workers.clip.stage import ClipStage
from tests.helpers import wait_until
from tests.workers.clip.conftest import clip_run, copy_images

REPO = Path(__file__).resolve().parents[3]


def clip_table(store: Store, shard: int) -> list[dict]:
    return pq.read_table(io.BytesIO(store.read_bytes(layout.clip_shard(shard)))).to_pylist()


def reading_the_shard(worker: psutil.Process, tar: str):
    """The pool process that has the shard's tar open, i.e. is in the middle of the shard."""
    for child in worker.children(recursive=True):
        try:
            if any(f.path == tar for f in child.open_files()):
                return child
        except psutil.Error:  # it ended between listing and asking
            continue
    return None


@pytest.mark.timeout(300)
def test_pool_process_killed_mid_shard_loses_nothing(tmp_path, isolated_state, downloaded):
    # Small batches and fp32 keep the shard busy for many forward passes.
    options = {"clip_batch_size": 8, "clip_precision": "fp32"}
    reference = str(tmp_path / "reference")
    copy_images(downloaded, reference, shards=(0,))
    execute(ClipStage(clip_run(reference, **options)), Store(reference), 0)

    store_uri = str(tmp_path / "store")
    store = copy_images(downloaded, store_uri, shards=(0,))
    clip_run(store_uri, **options)
    fleet = Fleet(log_dir=tmp_path)
    try:
        fleet.start_redis(state_dir(str(tmp_path / "redis")))
        worker = psutil.Process(fleet.start_worker(["gpu-clip"], concurrency=1).pid)
        fleet.wait_for_workers(1)
        make_app(fleet.broker).send_task("clipfleet.clip", args=(store_uri, 0))
        victim = wait_until(lambda: reading_the_shard(worker, store.path(layout.image_shard(0))), 120,
                            "the pool process reading the shard")
        victim.send_signal(signal.SIGKILL)
        assert store.marker("clip", 0) is None and store.list("clip") == []
        # reject_on_worker_lost: the task goes straight back to the queue, a fresh pool process runs it.
        marker = wait_until(lambda: store.marker("clip", 0), 180, "the requeued shard")
    finally:
        fleet.stop(grace=5)

    ours, theirs = clip_table(store, 0), clip_table(Store(reference), 0)
    assert [(r["key"], r["kept"], r["model"]) for r in ours] == [(r["key"], r["kept"], r["model"]) for r in theirs]
    np.testing.assert_allclose([r["similarity"] for r in ours], [r["similarity"] for r in theirs], atol=1e-5)
    assert marker["stats"]["samples"] == len(downloaded.rows(0))
    log = (tmp_path / "worker-gpu-clip.log").read_text()
    assert log.count("succeeded in") == 1


@pytest.mark.timeout(600)
def test_clipfleet_run_filters_and_embeds_a_url_list(tmp_path, isolated_state, downloaded):
    truth = list(downloaded.truth.values())[:60]
    pq.write_table(pa.table({"url": [r["url"] for r in truth], "caption": [r["caption"] for r in truth],
                             "language": [r["language"] for r in truth]}), tmp_path / "urls.parquet")
    store_uri = str(tmp_path / "store")
    with SandboxServer(downloaded.world):
        proc = subprocess.run(
            [sys.executable, "-m", "clipfleet.producer.cli", "run", "--urls", str(tmp_path / "urls.parquet"),
             "--store", store_uri, "--until", "embed", "--allow-private-addresses", "--shard-size", "30",
             "--resize-mode", "keep_ratio", "--filter-model", "shapes", "--multilingual-filter-model", "shapes",
             "--embed-model", "shapes"],
            cwd=REPO, capture_output=True, text=True, timeout=560, env={**os.environ, "CLIPFLEET_LOG_LEVEL": "WARNING"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = Store(store_uri)
    run = store.read_json("run.json")
    assert (run["clip"]["min_similarity_en"], run["clip"]["min_similarity_other"]) == (0.7, 0.7)
    assert store.done("clip") == store.done("embed") == {"00000", "00001"}
    right = {r["url"] for r in truth if r["caption_correct"]}
    kept_urls = []
    for shard in (0, 1):
        meta = pq.read_table(io.BytesIO(store.read_bytes(layout.embedding_metadata(shard)))).to_pylist()
        img = np.load(io.BytesIO(store.read_bytes(layout.image_embeddings(shard))))
        assert img.shape == (len(meta), 128)
        assert store.marker("embed", shard)["stats"]["reused_from_clip"] == len(meta)  # encoded once
        kept_urls += [m["url"] for m in meta]
    # What is kept is (almost) exactly the right captions.
    assert len(set(kept_urls) & right) >= 0.95 * len(right)
    assert len(set(kept_urls) - right) <= 0.05 * len(kept_urls)
