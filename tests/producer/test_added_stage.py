"""Adding a stage is one package and one registry entry: a stage defined in the tests
(tests/producer/caption_stage.py), registered there, runs end to end through a real worker of its
own queue, and shows in run's summary, status and the report, none of which names it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.producer.test_run_outcome import small_web  # noqa: F401  (the module's sandbox web)

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "tests.producer.caption_stage"


def cli(*args, timeout=280) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPFLEET_PLUGINS": PLUGIN, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(400)
def test_a_stage_added_in_one_place_runs_through_a_worker_and_shows_everywhere(tmp_path, isolated_state,
                                                                             small_web):  # noqa: F811
    world, _ = small_web
    urls = pq.read_table(world / "ground_truth" / "images.parquet").column("url").to_pylist()[:12]
    captions = [("a red circle" if i % 3 else "circle") for i in range(12)]  # 4 of 12 have one word
    pq.write_table(pa.table({"url": urls, "caption": captions}), tmp_path / "in.parquet")
    store = tmp_path / "store"

    helped = cli("run", "--help")
    assert "--min-caption-words" in helped.stdout and "caption stats (a test stage)" in helped.stdout

    proc = cli("run", "--urls", str(tmp_path / "in.parquet"), "--store", str(store), "--until", "caption-stats",
               "--shard-size", "8", "--allow-private-addresses", "--min-caption-words", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "caption-stats: 2 of 2 shards done, 0 failed, 12 samples in, 8 out" in proc.stdout
    assert "dropped: short caption 4" in proc.stdout
    assert f"outputs: {store}/caption-stats/" in proc.stdout

    written = pa.concat_tables(pq.read_table(p) for p in sorted((store / "caption-stats").glob("*.parquet")))
    assert written.num_rows == 12 and sum(written.column("kept").to_pylist()) == 8
    assert sorted(set(written.column("words").to_pylist())) == [1, 3]
    marker = json.loads((store / "_markers" / "caption-stats" / "00000.json").read_text())
    assert marker["host"] and marker["samples_in"] == 8 and marker["dropped"] == ["short caption"]
    assert json.loads((store / "run.json").read_text())["caption-stats"] == {"min_caption_words": 2}

    status = json.loads(cli("status", "--store", str(store), "--json").stdout)
    entry = status["stages"]["caption-stats"]
    assert (entry["done"], entry["expected"], entry["samples_done"], entry["samples_out"]) == (2, 2, 12, 8)
    assert entry["totals"]["short caption"] == 4 and entry["totals"]["words"] == 8 * 3 + 4

    report = cli("report", "--store", str(store), "--out", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert "caption-stats" in page and "short caption" in page
