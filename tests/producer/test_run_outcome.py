"""A run says what it produced and fails when a stage stored nothing; an empty input says so;
a store stopped at one stage is taken further with a later --until."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.producer import register as runlib
from clipfleet.producer.fleet import free_port
from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "clipfleet.producer.cli"]


@pytest.fixture(scope="module")
def small_web(tmp_path_factory):
    directory = tmp_path_factory.mktemp("web")
    make_sandbox(directory, samples=24, port=free_port(), seed=7, wat_files=2)
    with SandboxServer(directory) as server:
        yield directory, server


def run_cli(*args, timeout=280) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_a_stage_that_stored_nothing_fails_the_run_with_the_reason(tmp_path, isolated_state, small_web):
    world, _ = small_web
    urls = pq.read_table(world / "ground_truth" / "images.parquet").column("url").to_pylist()[:12]
    pq.write_table(pa.table({"url": urls, "caption": [f"a picture {i}" for i in range(12)]}), tmp_path / "in.parquet")
    # Loopback URLs without --allow-private-addresses: every one is refused, as it should be.
    proc = run_cli("run", "--urls", str(tmp_path / "in.parquet"), "--store", str(tmp_path / "store"),
                   "--until", "download", "--shard-size", "8")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "download: 2 of 2 shards done, 0 failed, 12 samples in, 0 out" in proc.stdout
    assert "download stored no samples from 12 input samples" in proc.stderr
    assert "private address" in proc.stderr
    assert f"outputs: {tmp_path / 'store'}/images/" in proc.stdout


def test_an_empty_input_says_it_is_empty(tmp_path, isolated_state):
    pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    proc = run_cli("run", "--urls", str(tmp_path / "empty.parquet"), "--store", str(tmp_path / "store"),
                   "--until", "download", timeout=120)
    assert proc.returncode == 1
    assert "the input is empty" in proc.stderr and "empty.parquet" in proc.stderr


def test_register_takes_a_store_further_and_names_a_real_conflict(tmp_path):
    store = Store(str(tmp_path / "store"))
    first = RunConfig.make(store=store.uri, inputs=["a.wat.gz"], input_kind="wat", until="extract")
    runlib.register(store, first)
    store.commit("extract", 0, {}, {"stats": {}, "next_shards": []})

    # A later --until and new options for download, which has not run: the run goes on.
    further = RunConfig.make(store=store.uri, inputs=["a.wat.gz"], input_kind="wat", until="download",
                             image_size=128)
    assert set(runlib.register(store, further)) == {"until", "--image-size"}
    saved = store.read_json("run.json")
    assert saved["until"] == "download" and saved["download"]["image_size"] == 128
    assert saved["created_at"] == first.created_at and saved["updated_at"] >= first.created_at

    # An option of extract, which ran, is a conflict that names the flag.
    changed = RunConfig.make(store=store.uri, inputs=["a.wat.gz"], input_kind="wat", until="download",
                             image_size=128, min_language_score=0.9)
    with pytest.raises(runlib.RunError, match=r"different --min-language-score \(stages extract ran"):
        runlib.register(store, changed)
    other_input = RunConfig.make(store=store.uri, inputs=["b.wat.gz"], input_kind="wat", until="download",
                                 image_size=128)
    with pytest.raises(runlib.RunError, match="different --inputs"):
        runlib.register(store, other_input)


@pytest.mark.timeout(600)
def test_a_run_stopped_after_extract_continues_to_download(tmp_path, isolated_state, small_web):
    world, _ = small_web
    wats = sorted(str(p) for p in (world / "wat").iterdir())
    store_uri = str(tmp_path / "store")
    common = ["--wat", *wats, "--store", store_uri, "--allow-private-addresses", "--shard-size", "10"]
    extract = run_cli("run", *common, "--until", "extract")
    assert extract.returncode == 0, extract.stdout + extract.stderr
    store = Store(store_uri)
    url_shards = store.done("extract") and sorted(n[:-8] for n in store.list("urls") if n.endswith(".parquet"))
    assert url_shards and store.list("images") == []

    further = run_cli("run", *common, "--until", "download", "--image-size", "64")
    assert further.returncode == 0, further.stdout + further.stderr
    assert store.done("download") == set(url_shards)
    assert "resumed" in further.stdout  # the shards extract had handed on were sent to download
    rows = [r for n in url_shards for r in pq.read_table(io.BytesIO(store.read_bytes(f"images/{n}.parquet"))).to_pylist()]
    stored = [r for r in rows if r["status"] == "success"]  # the sandbox's pages link some broken images
    assert len(stored) >= 20 and {max(r["width"], r["height"]) for r in stored} == {64}  # the new --image-size
