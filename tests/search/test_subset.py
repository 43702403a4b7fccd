"""`clipfleet subset` writes a parquet that img2dataset downloads as it is."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq


def test_subset_downloads_with_img2dataset(search_store, sandbox, tmp_path):
    store, known = search_store
    out = tmp_path / "subset.parquet"
    done = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "subset", "--store", store,
                           "--query", "a green circle", "--k", "25", "--max-punsafe", "0.5",
                           "--max-pwatermark", "0.5", "--deduplicate", "--cache-dir", str(tmp_path / "cache"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 25 of 25 samples" in done.stdout
    table = pq.read_table(out)
    assert table.num_rows == 25
    assert table.column_names[:3] == ["url", "caption", "similarity"]
    assert {"punsafe", "pwatermark", "aesthetic", "language", "id"} <= set(table.column_names)
    rows = table.to_pylist()
    assert all(r["punsafe"] <= 0.5 and r["pwatermark"] <= 0.5 for r in rows)
    assert all(known[r["id"]]["url"] == r["url"] for r in rows)
    sims = [r["similarity"] for r in rows]
    assert sims == sorted(sims, reverse=True)
    green_circles = sum((known[r["id"]]["true_color"], known[r["id"]]["true_shape"]) == ("green", "circle")
                        for r in rows[:5])
    assert green_circles >= 4

    images = tmp_path / "images"
    img2dataset = Path(sys.executable).parent / "img2dataset"
    ran = subprocess.run([str(img2dataset), "--url_list", str(out), "--input_format", "parquet",
                          "--url_col", "url", "--caption_col", "caption", "--output_folder", str(images),
                          "--output_format", "files", "--processes_count", "1", "--thread_count", "4",
                          "--image_size", "64", "--save_additional_columns", '["similarity","punsafe"]',
                          "--enable_wandb", "False"], capture_output=True, text=True, timeout=300,
                         env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": str(img2dataset.parent)})
    assert ran.returncode == 0, ran.stderr[-2000:]
    stats = [json.loads(p.read_text()) for p in images.glob("*_stats.json")]
    assert sum(s["successes"] for s in stats) == 25
    captions = sorted(p.read_text() for p in images.rglob("*.txt"))
    assert captions == sorted(r["caption"] for r in rows)


def test_subset_says_what_it_could_not_do(search_store, tmp_path):
    store, _ = search_store
    out = tmp_path / "none.parquet"
    done = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "subset", "--store", store,
                           "--query", "anything", "--k", "5", "--language", "xx", "--cache-dir",
                           str(tmp_path / "cache"), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "wrote 0 of 5" in done.stdout
    assert pq.read_table(out).num_rows == 0
