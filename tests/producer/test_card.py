"""The dataset card: a real run (`clipfleet run` with its embedded Redis and fleet, on a sandbox web
on loopback) writes <store>/README.md when it settles; `datasets` loads both of its configs; its
counts are the markers'; a takedown and `clipfleet card` rewrite it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipfleet.producer.fleet import free_port
from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared import layout
from clipfleet.shared.storage import Store

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "clipfleet.producer.cli"]
STAGES = ("extract", "download", "clip", "embed", "tag", "index")


def real_run(work: Path, *options: str) -> tuple[Path, str]:
    """(store directory, the run's stdout) of a whole run through index on a small sandbox web."""
    world = work / "world"
    make_sandbox(world, samples=80, port=free_port(), seed=3, wat_files=1)
    wat = sorted((world / "wat").iterdir())[0]
    store = work / "store"
    with SandboxServer(world):
        proc = subprocess.run(
            CLI + ["run", "--wat", str(wat), "--store", str(store), "--shard-size", "25",
                   "--allow-private-addresses", "--download-timeout", "5", "--filter-model", "shapes",
                   "--multilingual-filter-model", "shapes", "--embed-model", "shapes", *options],
            cwd=REPO, capture_output=True, text=True, timeout=500,
            env={**os.environ, "CLIPFLEET_STATE_DIR": str(work / "state")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return store, proc.stdout


@pytest.fixture(scope="module")
def card_run(tmp_path_factory):
    return real_run(tmp_path_factory.mktemp("card"))


def card_counts(text: str) -> dict:
    """stage -> (done, expected, failed, samples in, samples out), from the card's table."""
    rows = re.findall(r"^\| (\w+) \| (\d+) / (\d+) \| (\d+) \| ([\d,–]+) \| ([\d,–]+) \|", text, re.M)
    return {r[0]: tuple(None if v == "–" else int(v.replace(",", "")) for v in r[1:]) for r in rows}


def marker_counts(store: Store) -> dict:
    out = {}
    for stage in STAGES:
        markers = [store.marker(stage, name) for name in sorted(store.done(stage))]
        out[stage] = (len(markers), sum(m["samples_in"] for m in markers), sum(m["samples_out"] for m in markers))
    return out


def in_dataset_now(text: str) -> int:
    return int(re.search(r"in `dataset/` now: ([\d,]+)", text).group(1).replace(",", ""))


def parquet_rows(store_dir: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in (store_dir / "dataset").glob("*.parquet"))


def test_a_settled_run_has_a_card_that_datasets_loads_and_whose_counts_are_the_markers(card_run, tmp_path):
    import datasets
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    store_dir, out = card_run
    store = Store(str(store_dir))
    card_path = store_dir / layout.DATASET_CARD
    assert f"dataset card: {store.url(layout.DATASET_CARD)}" in out
    text = card_path.read_text()

    card = DatasetCard.load(card_path)
    assert card.data.license == "other" and "no license to them is granted" in text
    configs = MetadataConfigs.from_dataset_card_data(card.data)
    assert set(configs) == {"default", "webdataset"}

    # Every stage's shards and samples, as the markers count them.
    table, markers = card_counts(text), marker_counts(store)
    assert list(table) == list(STAGES)
    for stage, (done, n_in, n_out) in markers.items():
        assert done > 0
        assert table[stage] == (done, done, 0, n_in, n_out), stage
    published = markers["tag"][2]
    assert published > 0 and in_dataset_now(text) == published == parquet_rows(store_dir)
    assert card.data.size_categories == ["n<1K"]

    # The default config, from the card alone; the tars through the card's webdataset config.
    rows = datasets.load_dataset(str(store_dir), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(rows) == published
    assert {"URL", "TEXT", "similarity", "punsafe", "hash", "key"} <= set(rows.column_names)
    tars = {d["split"]: str(store_dir / d["path"]) for d in configs["webdataset"]["data_files"]}
    samples = datasets.load_dataset("webdataset", data_files=tars, split="train", cache_dir=str(tmp_path / "hf"))
    with_image = sum(store.marker("tag", n)["stats"]["published_with_image"] for n in store.done("tag"))
    assert len(samples) == with_image > 0
    assert sorted(s["json"]["key"] for s in samples) == sorted(k for k in rows["key"] if k in set(samples["__key__"]))
    assert samples[0]["jpg"].size[0] > 0

    # What the card says of the run's filters and models comes from run.json and the model's files.
    cfg = store.read_json(layout.RUN_FILE)
    assert f"kept at ≥ {cfg['clip']['min_similarity_en']} with `shapes`" in text
    assert "| download | `--respect` |" in text
    assert re.search(r"`weights.npz` sha256 `[0-9a-f]{64}`", text)
    refused: dict = {}
    for name in store.done("download"):
        for reason, n in store.marker("download", name)["stats"].get("refused", {}).items():
            refused[reason] = refused.get(reason, 0) + n
    for reason, n in refused.items():
        assert f"- download, refused: {reason} {n:,}" in text

def test_a_takedown_and_the_card_command_rewrite_the_card(card_run, tmp_path):
    store_dir = tmp_path / "store"
    shutil.copytree(card_run[0], store_dir)
    (store_dir / layout.DATASET_CARD).unlink()
    done = subprocess.run(CLI + ["card", "--store", str(store_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    before = in_dataset_now((store_dir / layout.DATASET_CARD).read_text())

    urls = pq.read_table(sorted((store_dir / "dataset").glob("*.parquet"))[0]).column("URL").to_pylist()[:2]
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    proc = subprocess.run(CLI + ["takedown", "--store", str(store_dir), "--urls", str(tmp_path / "urls.txt"),
                                 "--reason", "asked by the owner"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (store_dir / layout.DATASET_CARD).read_text()
    assert in_dataset_now(text) == before - 2 == parquet_rows(store_dir)
    assert "removed by takedowns since: 2" in text
    assert re.search(r"^- .*: 2 samples matched \(0 of them removed before\), reason: asked by the owner$", text, re.M)


def test_the_card_command_names_a_store_without_a_run(tmp_path):
    proc = subprocess.run(CLI + ["card", "--store", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "holds no run" in proc.stderr
