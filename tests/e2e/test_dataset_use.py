"""The published dataset used the way LAION-5B's was, by the tools people use on it, on the files
as a run writes them (tests/producer/pipeline_store.py builds the run through the stages):

- open_clip_train trains a small CLIP on dataset/ as webdataset shards, and its loss falls;
- img2dataset downloads a `clipfleet subset` file, as the subset command prints it, from the
  sandbox web;
- embedding-reader reads embeddings/ with its metadata, rows aligned.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.models import model_folder
from tests.producer.pipeline_store import built_run, report_world  # noqa: F401 (fixtures)

VENV_BIN = Path(sys.executable).parent


def dataset_tars(store_dir: Path) -> list[Path]:
    return sorted((store_dir / "dataset").glob("*.tar"))


def losses(log: Path) -> list[float]:
    return [float(v) for v in re.findall(r"Contrastive_loss: ([0-9.]+) \(", log.read_text())]


def test_open_clip_train_learns_from_the_published_shards(built_run, tmp_path):
    directory, info = built_run
    tars = dataset_tars(directory)
    assert [t.stem for t in tars] == [f"{s:05d}" for s in info["shards"]]
    samples = sum(pq.read_table(directory / layout.dataset_shard(s, "parquet")).num_rows for s in info["shards"])
    # The shapes CLIP's architecture, from its open_clip config and no weights: trained from scratch.
    arch = tmp_path / "arch"
    arch.mkdir()
    shutil.copy(model_folder("shapes") / "open_clip_config.json", arch)
    names = ",".join(t.stem for t in tars)
    train_data = f"{directory}/dataset/{{{names}}}.tar"
    logs = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, "-m", "open_clip_train.main", "--train-data", train_data, "--dataset-type", "webdataset",
         "--train-num-samples", str(samples), "--batch-size", "16", "--epochs", "5", "--model", f"local-dir:{arch}",
         "--workers", "0", "--device", "cpu", "--precision", "fp32", "--lr", "2e-3", "--warmup", "4", "--seed", "0",
         "--logs", str(logs), "--name", "dataset-use", "--log-every-n-steps", "1", "--save-frequency", "0",
         "--report-to", ""],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = losses(logs / "dataset-use" / "out.log")
    assert len(seen) >= 5 * (samples // 16)  # every epoch ran its steps over the shards
    assert all(np.isfinite(seen))
    first, last = np.mean(seen[:5]), np.mean(seen[-5:])
    assert last < 0.85 * first, seen


def test_img2dataset_downloads_a_subset_file(built_run, report_world, tmp_path):
    from clipfleet.sandbox.server import SandboxServer
    store_dir, info = built_run
    truth = {r["url"]: r for r in pq.read_table(report_world / "ground_truth" / "images.parquet").to_pylist()}
    kept = [r for s in info["shards"] for r in pq.read_table(store_dir / layout.dataset_shard(s, "parquet")).to_pylist()]
    colour, shape = Counter((truth[r["URL"]]["true_color"], truth[r["URL"]]["true_shape"]) for r in kept
                            if r["URL"] in truth and truth[r["URL"]]["caption_correct"]).most_common(1)[0][0]

    subset = tmp_path / "subset.parquet"
    proc = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "subset", "--store", str(store_dir),
                           "--query", f"a {colour} {shape}", "--k", "8", "--out", str(subset),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    command = next(line for line in proc.stdout.splitlines() if line.startswith("download them with: "))
    argv = command.removeprefix("download them with: ").replace("OUT", str(tmp_path / "out")).split()
    rows = pq.read_table(subset).to_pylist()
    assert len(rows) == 8
    top = truth.get(rows[0]["url"], {})
    assert (top.get("true_color"), top.get("true_shape")) == (colour, shape)

    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    with SandboxServer(report_world):
        done = subprocess.run([str(VENV_BIN / argv[0]), *argv[1:], "--output_format", "webdataset",
                               "--processes_count", "1", "--thread_count", "4", "--image_size", "64"],
                              capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert stats["count"] == 8 and stats["successes"] == 8, stats
    got = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert sorted((r["url"], r["caption"]) for r in got) == sorted((r["url"], r["caption"]) for r in rows)
    assert all(r["status"] == "success" for r in got)


def test_embedding_reader_reads_the_embeddings(built_run):
    from embedding_reader import EmbeddingReader
    directory, info = built_run
    embeddings = directory / layout.EMBEDDINGS
    reader = EmbeddingReader(str(embeddings / "img_emb"), file_format="parquet_npy",
                             metadata_folder=str(embeddings / "metadata"), meta_columns=["key", "caption", "similarity"])
    expected = sum(pq.read_table(directory / layout.embedding_metadata(s)).num_rows for s in info["shards"])
    assert reader.count == expected and reader.dimension == 128
    texts = EmbeddingReader(str(embeddings / "text_emb"), file_format="npy")
    image_rows, text_rows, meta = [], [], []
    for batch, frame in reader(batch_size=40, show_progress=False):
        image_rows.append(batch)
        meta.append(frame)
    for batch, _ in texts(batch_size=40, show_progress=False):
        text_rows.append(batch)
    images, captions = np.concatenate(image_rows).astype(np.float32), np.concatenate(text_rows).astype(np.float32)
    import pandas as pd
    frame = pd.concat(meta)
    assert len(frame) == expected and frame["key"].is_unique
    # Rows are aligned: each image with its own caption scores the similarity the metadata holds.
    cosine = (images * captions).sum(1)
    assert np.allclose(cosine, frame["similarity"].to_numpy(), atol=0.02)
    assert np.allclose(np.linalg.norm(images, axis=1), 1.0, atol=0.01)
