"""`clipfleet run --urls ... --until tag` through real download, clip, embed and tagging workers."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.sandbox.server import SandboxServer
from clipfleet.shared import layout
from clipfleet.shared.models.heads import roc_auc
from clipfleet.shared.storage import Store

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.timeout(600)
def test_clipfleet_run_tags_and_publishes_a_url_list(tmp_path, isolated_state, world, truth):
    rows = list(truth.values())[:120]
    pq.write_table(pa.table({"url": [r["url"] for r in rows], "caption": [r["caption"] for r in rows],
                             "language": [r["language"] for r in rows]}), tmp_path / "urls.parquet")
    store_uri = str(tmp_path / "store")
    with SandboxServer(world):
        proc = subprocess.run(
            [sys.executable, "-m", "clipfleet.producer.cli", "run", "--urls", str(tmp_path / "urls.parquet"),
             "--store", store_uri, "--until", "tag", "--allow-private-addresses", "--shard-size", "60",
             "--resize-mode", "keep_ratio", "--filter-model", "shapes", "--multilingual-filter-model", "shapes",
             "--embed-model", "shapes", "--aesthetic-head", "none"],
            cwd=REPO, capture_output=True, text=True, timeout=560, env={**os.environ, "CLIPFLEET_LOG_LEVEL": "WARNING"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    store = Store(store_uri)
    run = store.read_json("run.json")
    assert run["tag"]["punsafe_head"] == "shapes:unsafe" and run["tag"]["aesthetic_head"] == "none"
    assert run["tag"]["null_columns"] == {"aesthetic": "--aesthetic-head none"}
    assert store.done("tag") == {"00000", "00001"}
    published, watermark, pwatermark = 0, [], []
    for shard in (0, 1):
        meta = pq.read_table(io.BytesIO(store.read_bytes(layout.embedding_metadata(shard))))
        data = pq.read_table(io.BytesIO(store.read_bytes(layout.dataset_shard(shard, "parquet"))))
        assert data.column("key").to_pylist() == meta.column("key").to_pylist()
        assert data.column("aesthetic").null_count == data.num_rows
        marker = store.marker("tag", shard)
        assert marker["stats"]["tags_per_s_per_core"] > 0
        assert json.dumps(marker["stats"]["null_columns"]) == '{"aesthetic": "--aesthetic-head none"}'
        published += data.num_rows
        watermark += [truth[url]["watermark"] for url in data.column("URL").to_pylist()]
        pwatermark += data.column("pwatermark").to_pylist()
    assert published >= 60
    assert roc_auc(np.array(watermark), np.array(pwatermark)) >= 0.95
