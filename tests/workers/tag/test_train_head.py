"""`clipfleet train-head`: labelled embeddings in clip-retrieval's layout in, a head out that is as
good as the one shipped with `shapes`, and whose --tag column the tag stage adds."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.producer.cli import main
from clipfleet.sandbox.evaluate import draw_sample, embed_images
from clipfleet.shared import layout
from clipfleet.shared.models.heads import load_head, metrics, roc_auc
from clipfleet.shared.pipeline import execute
from clipfleet.workers.tag.stage import TagStage

from .conftest import SHARD, run_config

TAGS = {"watermark": "binary", "unsafe": "binary", "aesthetic": "graded"}


def write_layout(directory, embeddings, keys):
    (directory / "img_emb").mkdir(parents=True)
    (directory / "metadata").mkdir()
    np.save(directory / "img_emb" / "img_emb_00000.npy", embeddings.astype(np.float16))
    pq.write_table(pa.table({"key": keys}), directory / "metadata" / "metadata_00000.parquet")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, shapes):
    """Sandbox pictures drawn as the shipped heads' were (half watermarked, half unsafe), embedded
    as served (what a keep_ratio shard shows the CLIP)."""
    model, preprocess, _ = shapes
    pictures, drawn = draw_sample(60, seed=5151, watermark_share=0.5, unsafe_share=0.5)  # the shipped heads trained on 2880
    directory = tmp_path_factory.mktemp("labelled")
    keys = [f"{i:09d}" for i in range(len(drawn))]
    write_layout(directory / "embeddings", embed_images(model, preprocess, pictures), keys)
    for tag in TAGS:
        pq.write_table(pa.table({"key": keys, "label": [float(getattr(d, tag)) for d in drawn]}),
                       directory / f"{tag}.parquet")
    return directory


@pytest.fixture(scope="module")
def fresh(shapes):
    model, preprocess, _ = shapes
    pictures, drawn = draw_sample(5, seed=6262)
    return embed_images(model, preprocess, pictures), drawn


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_a_trained_head_reproduces_the_shipped_heads_quality(labelled, fresh, tag, capsys):
    out = labelled / f"{tag}.pt"
    assert main(["train-head", "--embeddings", str(labelled / "embeddings"), "--labels",
                 str(labelled / f"{tag}.parquet"), "--out", str(out), "--tag", tag]) == 0
    printed = capsys.readouterr().out
    assert ("held-out Spearman" if TAGS[tag] == "graded" else "held-out accuracy") in printed
    embeddings, drawn = fresh
    truth = np.array([float(getattr(d, tag)) for d in drawn])
    trained, shipped = load_head(f"mlp:{out}"), load_head(f"shapes:{tag}")
    assert trained.kind == shipped.kind == TAGS[tag] and trained.info["tag"] == tag
    ours = metrics(truth, trained.score_embeddings(embeddings), trained.kind)
    theirs = metrics(truth, shipped.score_embeddings(embeddings), shipped.kind)
    if TAGS[tag] == "binary":
        assert ours["roc_auc"] >= 0.95 and ours["roc_auc"] >= theirs["roc_auc"] - 0.02, (ours, theirs)
        assert ours["accuracy"] >= theirs["accuracy"] - 0.03, (ours, theirs)
    else:
        assert ours["spearman"] >= 0.8 and ours["spearman"] >= theirs["spearman"] - 0.05, (ours, theirs)
        assert 1 <= np.median(trained.score_embeddings(embeddings)) <= 10  # on the labels' scale


def test_bad_inputs_get_clear_errors(labelled, tmp_path, capsys):
    pq.write_table(pa.table({"key": ["nope"], "value": [1.0]}), tmp_path / "bad.parquet")
    assert main(["train-head", "--embeddings", str(labelled / "embeddings"), "--labels",
                 str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "h.pt")]) == 2
    assert "needs columns key and label" in capsys.readouterr().err
    assert main(["train-head", "--embeddings", str(tmp_path), "--labels",
                 str(labelled / "unsafe.parquet"), "--out", str(tmp_path / "h.pt")]) == 2
    assert "no img_emb" in capsys.readouterr().err


def test_a_user_tag_head_adds_its_column(store, truth, tmp_path, capsys):
    """Label the run's own embeddings (here: is the shape red?), train, and tag with it."""
    meta = pq.read_table(io.BytesIO(store.read_bytes(layout.embedding_metadata(SHARD))))
    red = [truth[url]["true_color"] == "red" for url in meta.column("url").to_pylist()]
    pq.write_table(pa.table({"key": meta.column("key"), "label": red}), tmp_path / "red.parquet")
    head = tmp_path / "red.pt"
    assert main(["train-head", "--embeddings", store.path(layout.EMBEDDINGS), "--labels",
                 str(tmp_path / "red.parquet"), "--out", str(head), "--tag", "red"]) == 0
    cfg = run_config(store.uri, tag_heads=(str(head),))
    cfg.save(store)
    execute(TagStage(cfg), store, SHARD)
    tags = pq.read_table(io.BytesIO(store.read_bytes(layout.tag_shard(SHARD))))
    assert tags.column_names == ["key", "punsafe", "pwatermark", "aesthetic", "red"]
    assert roc_auc(np.array(red), tags.column("red").to_numpy()) >= 0.95
    data = pq.read_table(io.BytesIO(store.read_bytes(layout.dataset_shard(SHARD, "parquet"))))
    assert data.column_names == [*layout.DATASET_COLUMNS, "red"]  # a user's column after the published ones
