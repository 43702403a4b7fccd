"""A `--detach`ed run publishes as a followed one does: when it settles, one worker of the fleet
(its sweeper) applies the run's --keep-top-percent across the whole run and writes the dataset card,
with no `clipfleet` command left running. Before, such a run published every sample and had no card."""
from __future__ import annotations

import os
import subprocess

import pyarrow.parquet as pq
import pytest

from clipfleet.producer.fleet import free_port, start_fleet
from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared import layout
from clipfleet.shared.stages import REGISTRY
from clipfleet.shared.storage import Store
from tests.helpers import wait_until
from tests.producer.test_card import CLI, REPO, card_counts, in_dataset_now, marker_counts
from tests.producer.test_refilter import judged, published

PERCENT = 40


@pytest.mark.timeout(600)
def test_a_detached_run_is_filtered_and_carded_by_the_fleet_when_it_settles(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFLEET_SWEEP_S", "1")
    monkeypatch.setenv("CLIPFLEET_STATE_DIR", str(tmp_path / "state"))
    world = tmp_path / "world"
    make_sandbox(world, samples=60, port=free_port(), seed=5, wat_files=1)
    wat = sorted((world / "wat").iterdir())[0]
    store_dir = tmp_path / "store"
    (tmp_path / "logs").mkdir()
    stages = ["extract", "download", "clip", "embed", "tag"]
    fleet = start_fleet([REGISTRY[s].queue for s in stages], flower=False, log_dir=tmp_path / "logs",
                        store_key=str(tmp_path / "key"))
    try:
        with SandboxServer(world):
            proc = subprocess.run(
                CLI + ["run", "--wat", str(wat), "--store", str(store_dir), "--broker", fleet.broker, "--detach",
                       "--until", "tag", "--shard-size", "20", "--allow-private-addresses", "--download-timeout", "5",
                       "--filter-model", "shapes", "--multilingual-filter-model", "shapes", "--embed-model", "shapes",
                       "--keep-top-percent", str(PERCENT)],
                cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ))
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert "enqueued" in proc.stdout and "dataset card" not in proc.stdout  # the run command is gone
            card = store_dir / layout.DATASET_CARD
            wait_until(card.exists, 400, "the fleet to write the detached run's dataset card")
    finally:
        fleet.stop()
    store = Store(str(store_dir))
    record = store.read_json(layout.FILTER_RECORD)
    assert record["keep_top_percent"] == PERCENT
    scores = judged(store_dir)
    assert scores and sum(map(len, scores.values())) > 10
    best = set()
    for name, rows in scores.items():  # exactly P% of each bucket across shards, the best ones
        n = int(round(len(rows) * PERCENT / 100))
        assert record["buckets"][name]["kept"] == n
        best |= {key for _, key in sorted(rows, reverse=True)[:n]}
    assert published(store_dir) == best
    assert sum(pq.read_metadata(p).num_rows for p in (store_dir / "dataset").glob("*.parquet")) == len(best)
    text = card.read_text()
    assert f"--keep-top-percent {PERCENT}" in text and in_dataset_now(text) == len(best)
    counts, markers = card_counts(text), marker_counts(store)
    for stage in stages:
        done, expected, _failed, samples_in, samples_out = counts[stage]
        assert (done, samples_in, samples_out) == markers[stage]
