"""The tagging stage on a shard that went through download and embedding: its tags against the
sandbox's ground truth, the published dataset's columns and readers, and the null columns."""
from __future__ import annotations

import io
import json

import mmh3
import numpy as np
import pyarrow.parquet as pq
import pytest

from clipfleet.shared import layout
from clipfleet.shared.models.heads import HeadError, roc_auc, spearman
from clipfleet.shared.pipeline import execute
from clipfleet.workers.registry import REGISTRY
from clipfleet.workers.tag.plan import plan_run, prepare
from clipfleet.workers.tag.stage import TagStage

from .conftest import SHARD, run_config


def read_parquet(store, rel):
    return pq.read_table(io.BytesIO(store.read_bytes(rel)))


def tag(store, **options):
    cfg = run_config(store.uri, **options)
    cfg.save(store)
    return execute(TagStage(cfg), store, SHARD)


def test_tags_match_ground_truth(store, truth):
    marker = tag(store)
    meta = read_parquet(store, layout.embedding_metadata(SHARD))
    tags = read_parquet(store, layout.tag_shard(SHARD))
    assert tags.column_names == ["key", "punsafe", "pwatermark", "aesthetic"]
    assert tags.column("key").to_pylist() == meta.column("key").to_pylist()  # rows aligned
    assert 120 <= tags.num_rows  # the pairs that passed download and the filter
    rows = [truth[url] for url in meta.column("url").to_pylist()]
    unsafe = np.array([r["unsafe"] for r in rows])
    watermark = np.array([r["watermark"] for r in rows])
    assert unsafe.sum() >= 10 and watermark.sum() >= 10
    quality = {"punsafe": roc_auc(unsafe, tags.column("punsafe").to_numpy()),
               "pwatermark": roc_auc(watermark, tags.column("pwatermark").to_numpy()),
               "aesthetic": spearman([r["aesthetic"] for r in rows], tags.column("aesthetic").to_numpy())}
    print("tag quality on the pipeline shard:", quality)
    assert quality["punsafe"] >= 0.95 and quality["pwatermark"] >= 0.95, quality
    assert quality["aesthetic"] >= 0.8, quality
    assert 1 <= np.median(tags.column("aesthetic").to_numpy()) <= 10  # LAION's 1-10 scale
    stats = marker["stats"]
    assert stats["tagged"] == tags.num_rows and stats["published"] == tags.num_rows
    assert stats["tags_per_s_per_core"] > 0
    assert "null_columns" not in stats


def test_published_dataset_has_laions_columns_and_only_kept_samples(store, truth):
    tag(store)
    meta = read_parquet(store, layout.embedding_metadata(SHARD))
    data = read_parquet(store, layout.dataset_shard(SHARD, "parquet"))
    assert tuple(data.column_names) == layout.DATASET_COLUMNS
    assert data.column("key").to_pylist() == meta.column("key").to_pylist()
    for row in data.to_pylist():
        assert row["hash"] == mmh3.hash64(row["URL"] + row["TEXT"])[0]
        assert row["TEXT"] == truth[row["URL"]]["caption"]
        assert row["similarity"] >= 0.7
    tags = read_parquet(store, layout.tag_shard(SHARD))
    assert data.column("punsafe").to_pylist() == tags.column("punsafe").to_pylist()
    # the perceptual hash download computed, beside LAION's hash
    images = read_parquet(store, layout.image_shard(SHARD, "parquet")).to_pylist()
    phash = {row["key"]: row["phash"] for row in images}
    assert all(row["phash"] and row["phash"] == phash[row["key"]] for row in data.to_pylist())
    assert data.column("contaminated").null_count == data.num_rows  # the run has no --decontaminate set


def test_webdataset_reads_the_published_tar(store):
    import webdataset as wds
    tag(store)
    data = {row["key"]: row for row in read_parquet(store, layout.dataset_shard(SHARD, "parquet")).to_pylist()}
    samples = list(wds.WebDataset(store.path(layout.dataset_shard(SHARD, "tar")), shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(data)
    for sample in samples:
        record = json.loads(sample["json"])
        # every column, duplicate_of only where set (publish.json_record says why)
        assert record.keys() == data[sample["__key__"]].keys() - {"duplicate_of"}
        assert record["hash"] == data[sample["__key__"]]["hash"]
        assert sample["txt"].decode() == record["TEXT"]
        assert any(ext in sample for ext in ("jpg", "png", "webp"))


def test_a_column_without_a_head_is_null_and_says_why(store):
    cfg = run_config(store.uri, aesthetic_head="none", pwatermark_head="auto")
    prepare(cfg)
    cfg.save(store)
    saved = json.loads(store.read_bytes("run.json"))
    assert saved["tag"]["aesthetic_head"] == "none"
    assert saved["tag"]["punsafe_head"] == "shapes:unsafe"
    assert "aesthetic" in saved["tag"]["null_columns"]
    marker = execute(TagStage(cfg), store, SHARD)
    tags = read_parquet(store, layout.tag_shard(SHARD))
    assert tags.column("aesthetic").null_count == tags.num_rows
    assert tags.column("punsafe").null_count == 0
    assert "aesthetic" in marker["stats"]["null_columns"]


def test_no_shipped_head_for_a_real_model_gives_null_columns_with_the_flag_to_pass(tmp_path):
    cfg = run_config(str(tmp_path / "s"), embed_model="ViT-L-14/openai")
    prepare(cfg)
    assert (cfg.tag.punsafe_head, cfg.tag.pwatermark_head, cfg.tag.aesthetic_head) == ("none",) * 3
    assert "--punsafe-head nsfw-l14:FILE" in cfg.tag.null_columns["punsafe"]
    assert "--aesthetic-head aesthetic-l14:FILE" in cfg.tag.null_columns["aesthetic"]


def test_a_head_of_the_wrong_width_is_refused_before_any_shard(tmp_path):
    cfg = run_config(str(tmp_path / "s"), embed_model="ViT-L-14/openai", punsafe_head="shapes:unsafe")
    with pytest.raises(HeadError, match=r"128-d embeddings, but --embed-model ViT-L-14/openai makes 768-d"):
        plan_run(cfg)
    with pytest.raises(HeadError, match="768-d"):
        TagStage(cfg)


def test_the_cli_refuses_a_wrong_width_head_before_writing_the_run(tmp_path, capsys):
    from clipfleet.producer.cli import main
    urls = tmp_path / "urls.parquet"
    import pyarrow as pa
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a red circle"]}), urls)
    store = tmp_path / "store"
    code = main(["run", "--urls", str(urls), "--store", str(store), "--until", "tag",
                 "--embed-model", "ViT-L-14/openai", "--punsafe-head", "shapes:unsafe"])
    assert code == 2
    assert "768-d" in capsys.readouterr().err
    assert not (store / "run.json").exists()


def test_a_mismatched_shard_is_refused_clearly(store):
    np.save(store.path(layout.image_embeddings(SHARD)), np.zeros((3, 128), np.float16))
    with pytest.raises(ValueError, match="has shape"):
        tag(store)
    assert store.marker("tag", SHARD) is None


def test_a_rerun_does_nothing_and_the_stage_is_registered(store):
    first = tag(store)
    again = execute(TagStage(run_config(store.uri)), store, SHARD)
    assert again["skipped"] and again["stats"] == first["stats"]
    assert REGISTRY["tag"].stage_class() is TagStage


def test_head_files_named_relative_to_here_are_recorded_absolute(tmp_path, monkeypatch):
    import torch

    from clipfleet.shared.models.heads import build_architecture
    torch.save(build_architecture("nsfw-b32").state_dict(), tmp_path / "b32.pth")
    monkeypatch.chdir(tmp_path)
    cfg = run_config(str(tmp_path / "s"), embed_model="ViT-B-32/openai", punsafe_head="nsfw-b32:b32.pth")
    prepare(cfg)
    assert cfg.tag.punsafe_head == f"nsfw-b32:{tmp_path / 'b32.pth'}"


def test_img2dataset_downloads_the_published_parquet_as_it_is(store, world, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from clipfleet.sandbox.server import SandboxServer
    tag(store)
    data = read_parquet(store, layout.dataset_shard(SHARD, "parquet")).to_pylist()
    img2dataset = Path(sys.executable).parent / "img2dataset"
    with SandboxServer(world):
        ran = subprocess.run([str(img2dataset), "--url_list", store.path(layout.dataset_shard(SHARD, "parquet")),
                              "--input_format", "parquet", "--url_col", "URL", "--caption_col", "TEXT",
                              "--output_folder", str(tmp_path / "again"), "--output_format", "files",
                              "--processes_count", "1", "--thread_count", "8", "--image_size", "64",
                              "--save_additional_columns", '["punsafe","pwatermark","aesthetic","hash"]',
                              "--enable_wandb", "False"], capture_output=True, text=True, timeout=300,
                             env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": str(img2dataset.parent)})
    assert ran.returncode == 0, ran.stderr[-2000:]
    stats = [json.loads(p.read_text()) for p in (tmp_path / "again").glob("*_stats.json")]
    assert sum(s["successes"] for s in stats) == len(data)
    by_url = {r["URL"]: r for r in data}
    for path in (tmp_path / "again").rglob("*.json"):
        if path.name.endswith("_stats.json"):
            continue
        sample = json.loads(path.read_text())
        assert sample["hash"] == by_url[sample["url"]]["hash"]
        assert sample["punsafe"] == pytest.approx(by_url[sample["url"]]["punsafe"])


def test_an_image_watermark_model_scores_the_shards_images(store, tmp_path):
    """LAION's efficientnet watermark architecture through the stage. Its weights here are a
    seeded initialisation (LAION's file is not on this machine): the test checks that each row
    gets the model's own score of that row's image, and a null where the image is missing."""
    import tarfile

    import torch
    from PIL import Image

    from clipfleet.shared.models.heads import build_architecture, load_head
    torch.manual_seed(0)
    torch.save(build_architecture("watermark-effnet").state_dict(), tmp_path / "wm.pth")
    # 24 samples: efficientnet_b3 costs about half a second an image on this CPU.
    meta = read_parquet(store, layout.embedding_metadata(SHARD)).slice(0, 24)
    pq.write_table(meta, store.path(layout.embedding_metadata(SHARD)))
    np.save(store.path(layout.image_embeddings(SHARD)), np.load(store.path(layout.image_embeddings(SHARD)))[:24])
    keys = meta.column("key").to_pylist()
    images = {}
    with tarfile.open(store.path(layout.image_shard(SHARD))) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            if ext == "jpg" and key in keys:
                images[key] = tar.extractfile(member).read()
    missing = keys[3]
    with tarfile.open(store.path(layout.image_shard(SHARD)), "w") as tar:  # one image gone
        for key, data in images.items():
            if key != missing:
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    marker = tag(store, pwatermark_head=f"watermark-effnet:{tmp_path / 'wm.pth'}", watermark_batch_size=16)
    scores = read_parquet(store, layout.tag_shard(SHARD)).column("pwatermark").to_pylist()
    head = load_head(f"watermark-effnet:{tmp_path / 'wm.pth'}", device="cpu")
    for row in (0, 1, 5, len(keys) - 1):
        expected = head.score_images([Image.open(io.BytesIO(images[keys[row]]))])[0]
        assert scores[row] == pytest.approx(expected, abs=1e-4)
    assert scores[3] is None
    assert marker["stats"]["pwatermark_null"] == {"no image": 1}
    assert marker["stats"]["published"] == len(keys) and marker["stats"]["published_with_image"] == len(keys) - 1


def test_a_shard_the_filter_emptied_publishes_empty_files(store):
    import webdataset as wds
    meta = read_parquet(store, layout.embedding_metadata(SHARD)).slice(0, 0)
    pq.write_table(meta, store.path(layout.embedding_metadata(SHARD)))
    np.save(store.path(layout.image_embeddings(SHARD)), np.zeros((0, 128), np.float16))
    marker = tag(store)
    assert read_parquet(store, layout.tag_shard(SHARD)).num_rows == 0
    data = read_parquet(store, layout.dataset_shard(SHARD, "parquet"))
    assert data.num_rows == 0 and tuple(data.column_names) == layout.DATASET_COLUMNS
    assert list(wds.WebDataset(store.path(layout.dataset_shard(SHARD, "tar")), shardshuffle=False)) == []
    assert marker["stats"]["tagged"] == 0
