"""The CLIP filter on downloaded sandbox shards, with the shipped `shapes` model: what is kept
against the ground truth, the buckets and their models, precision, bad samples, reruns."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipfleet.shared import layout
from clipfleet.shared.models import SHAPES_DIR, load_clip
from clipfleet.shared.models import runtime
from clipfleet.shared.pipeline import execute
from clipfleet.shared.storage import Store
from clipfleet.workers.clip.stage import ClipStage
from tests.workers.clip.conftest import SHARDS, clip_run, copy_images


def clip_rows(store: Store, shard: int) -> list[dict]:
    return pq.read_table(io.BytesIO(store.read_bytes(layout.clip_shard(shard)))).to_pylist()


def tar_images(store: Store, shard: int) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(layout.image_shard(shard)))) as tar:
        return {m.name.rsplit(".", 1)[0]: tar.extractfile(m).read() for m in tar.getmembers()
                if m.name.endswith(".jpg")}


def filter_shards(store_uri: str, downloaded, **options):
    copy_images(downloaded, store_uri)
    cfg = clip_run(store_uri, **options)
    stage = ClipStage(cfg)
    markers = [execute(stage, Store(store_uri), shard) for shard in SHARDS]
    return Store(store_uri), markers


def test_wrong_captions_are_filtered_with_precision_and_recall_against_the_truth(store_uri, downloaded):
    store, markers = filter_shards(store_uri, downloaded)
    judged, truth_wrong = [], []
    for shard in SHARDS:
        by_key = {r["key"]: r for r in downloaded.rows(shard)}
        rows = clip_rows(store, shard)
        assert [r["key"] for r in rows] == sorted(k for k, r in by_key.items() if r["status"] == "success")
        assert {r["model"] for r in rows} == {"shapes"}
        for row in rows:
            judged.append(not row["kept"])  # filtered out
            truth_wrong.append(not downloaded.truth[by_key[row["key"]]["url"]]["caption_correct"])
    filtered, wrong = np.array(judged), np.array(truth_wrong)
    assert wrong.sum() >= 40  # the world has enough wrong and no-language captions to measure
    precision = (filtered & wrong).sum() / filtered.sum()
    recall = (filtered & wrong).sum() / wrong.sum()
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)

    # The calibrated threshold of `shapes` is in force, in run.json and in every marker.
    run = store.read_json("run.json")
    assert run["clip"]["min_similarity_en"] == run["clip"]["min_similarity_other"] == 0.7
    for marker, shard in zip(markers, SHARDS):
        stats = marker["stats"]
        assert stats["min_similarity_en"] == stats["min_similarity_other"] == 0.7
        rows = clip_rows(store, shard)
        assert stats["samples"] == len(rows) and stats["kept"] == sum(r["kept"] for r in rows)
        assert stats["dropped"] == {"below threshold": len(rows) - stats["kept"]}
        assert stats["judged_by"] == {"shapes": len(rows)}
        assert stats["samples_per_s"] > 0
        assert marker["outputs"] == [layout.clip_shard(shard)]  # until clip: no embedding cache


def test_explicit_thresholds_override_the_models_calibration(tmp_path, downloaded):
    store, [marker, _] = filter_shards(str(tmp_path / "store"), downloaded, min_similarity_en=0.28,
                                       min_similarity_other=0.95)
    assert store.read_json("run.json")["clip"]["min_similarity_en"] == 0.28
    assert (marker["stats"]["min_similarity_en"], marker["stats"]["min_similarity_other"]) == (0.28, 0.95)
    languages = {r["key"]: r["language"] for r in downloaded.rows(0)}
    for row in clip_rows(store, 0):
        threshold = 0.28 if languages[row["key"]] == "en" else 0.95
        assert row["kept"] == (row["similarity"] >= threshold)


@pytest.fixture(scope="module")
def rotated_shapes(tmp_path_factory) -> str:
    """A second model: `shapes` with its text projection rotated, so its image-text cosines
    are unrelated to the captions. Only the bucket it judges can show its mark."""
    folder = tmp_path_factory.mktemp("models") / "rotated-shapes"
    shutil.copytree(SHAPES_DIR, folder)
    with np.load(SHAPES_DIR / "weights.npz") as packed:
        weights = {k: packed[k] for k in packed.files}
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(128, 128)))
    weights["text_projection"] = (weights["text_projection"].astype(np.float32) @ q).astype(np.float16)
    np.savez_compressed(folder / "weights.npz", **weights)
    return str(folder)


def direct_similarities(model_name: str, images: dict[str, bytes], captions: dict[str, str]) -> dict[str, float]:
    """image-text cosine from a plain fp32 model call, one sample at a time."""
    model, preprocess, tokenizer = load_clip(model_name)
    out = {}
    with torch.no_grad():
        for key, data in images.items():
            img = model.encode_image(preprocess(Image.open(io.BytesIO(data))).unsqueeze(0), normalize=True)
            txt = model.encode_text(tokenizer([captions[key]]), normalize=True)
            out[key] = float((img * txt).sum())
    return out


def test_each_language_bucket_is_judged_by_its_own_model(tmp_path, downloaded, rotated_shapes):
    store, [marker, _] = filter_shards(str(tmp_path / "store"), downloaded, multilingual_filter_model=rotated_shapes,
                                       clip_precision="fp32")
    source = {r["key"]: r for r in downloaded.rows(0)}
    rows = clip_rows(store, 0)
    english = [r for r in rows if source[r["key"]]["language"] == "en"]
    others = [r for r in rows if source[r["key"]]["language"] != "en"]
    assert len(english) >= 40 and len(others) >= 40
    assert {r["model"] for r in english} == {"shapes"} and {r["model"] for r in others} == {rotated_shapes}
    assert marker["stats"]["judged_by"] == {"shapes": len(english), rotated_shapes: len(others)}

    images, captions = tar_images(store, 0), {k: r["caption"] for k, r in source.items()}
    for model, group in (("shapes", english[:12]), (rotated_shapes, others[:12])):
        direct = direct_similarities(model, {r["key"]: images[r["key"]] for r in group}, captions)
        for row in group:
            assert row["similarity"] == pytest.approx(direct[row["key"]], abs=1e-4)
    # The rotated model recognises no caption: its bucket keeps (almost) nothing, English keeps its right ones.
    right = {k for k, r in source.items() if downloaded.truth[r["url"]]["caption_correct"]}
    assert sum(r["kept"] for r in others) <= 2
    assert sum(r["kept"] for r in english if r["key"] in right) >= 0.95 * sum(r["key"] in right for r in english)


def test_bf16_is_used_on_this_cpu_only_while_it_keeps_similarities_within_001_of_fp32(tmp_path, downloaded,
                                                                                      monkeypatch):
    runtime.encoder.cache_clear()
    exact, [exact_marker, _] = filter_shards(str(tmp_path / "fp32"), downloaded, clip_precision="fp32")
    auto, [auto_marker, _] = filter_shards(str(tmp_path / "auto"), downloaded)
    assert exact_marker["stats"]["precision"] == "shapes fp32"
    expected = "bf16" if runtime.cpu_has_bf16() else "fp32"
    assert auto_marker["stats"]["precision"] == f"shapes {expected}"
    for shard in SHARDS:
        a, b = clip_rows(exact, shard), clip_rows(auto, shard)
        deviation = max(abs(x["similarity"] - y["similarity"]) for x, y in zip(a, b))
        assert deviation <= runtime.BF16_TOLERANCE

    # A model that bf16 moves by more than the tolerance stays in fp32.
    runtime.encoder.cache_clear()
    monkeypatch.setattr(runtime, "BF16_TOLERANCE", 0.0)
    _, [strict, _] = filter_shards(str(tmp_path / "strict"), downloaded)
    assert strict["stats"]["precision"] == "shapes fp32"
    runtime.encoder.cache_clear()


def test_undecodable_uncaptioned_and_missing_samples_are_skipped_and_counted(tmp_path, downloaded):
    store_uri = str(tmp_path / "store")
    store = copy_images(downloaded, store_uri, shards=(0,))
    rows = downloaded.rows(0)
    images = tar_images(store, 0)
    corrupt, uncaptioned, missing = rows[3]["key"], rows[5]["key"], rows[7]["key"]
    # Rewrite the shard: one image's bytes garbled past its header, one caption empty, one image gone.
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(layout.image_shard(0)))) as src, \
            tarfile.open(fileobj=buf, mode="w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.startswith(missing):
                continue
            if member.name == f"{corrupt}.jpg":
                data = data[:200] + bytes(len(data) - 200)
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    store.write_bytes(layout.image_shard(0), buf.getvalue())
    table = pq.read_table(io.BytesIO(store.read_bytes(layout.image_shard(0, "parquet"))))
    captions = [("" if r["key"] == uncaptioned else r["caption"]) for r in table.to_pylist()]
    table = table.set_column(table.schema.get_field_index("caption"), "caption", [captions])
    out = io.BytesIO()
    pq.write_table(table, out)
    store.write_bytes(layout.image_shard(0, "parquet"), out.getvalue())

    marker = execute(ClipStage(clip_run(store_uri)), store, 0)
    result = {r["key"]: r for r in clip_rows(store, 0)}
    assert len(result) == len(images)  # every downloaded sample has its row
    for key in (corrupt, uncaptioned, missing):
        assert (result[key]["similarity"], result[key]["kept"], result[key]["model"]) == (None, False, None)
    stats = marker["stats"]
    assert {k: stats["dropped"][k] for k in ("undecodable", "no caption", "missing image")} == \
        {"undecodable": 1, "no caption": 1, "missing image": 1}
    assert stats["samples"] == len(images)
    assert sum(stats["dropped"].values()) + stats["kept"] == len(images)
    assert sum(r["similarity"] is not None for r in result.values()) == len(images) - 3


def test_a_rerun_is_idempotent(tmp_path, downloaded):
    store, first = filter_shards(str(tmp_path / "store"), downloaded)
    before = {shard: store.read_bytes(layout.clip_shard(shard)) for shard in SHARDS}
    stage = ClipStage(clip_run(str(tmp_path / "store")))
    again = [execute(stage, store, shard) for shard in SHARDS]
    assert all(m["skipped"] for m in again)
    assert [m["finished_at"] for m in again] == [m["finished_at"] for m in first]
    # Run again from scratch (markers gone): the same rows.
    store.fs.rm(store.path("_markers/clip"), recursive=True)
    for shard in SHARDS:
        execute(stage, store, shard)
        assert pq.read_table(io.BytesIO(store.read_bytes(layout.clip_shard(shard)))).to_pylist() == \
            pq.read_table(io.BytesIO(before[shard])).to_pylist()
    assert json.loads(store.read_bytes("_markers/clip/00000.json"))["stats"]["kept"] == first[0]["stats"]["kept"]


def test_a_model_whose_weights_are_not_here_fails_naming_it_and_builds_nothing(tmp_path, downloaded):
    from clipfleet.shared.models import ModelNotAvailable
    store = copy_images(downloaded, str(tmp_path / "store"), shards=(0,))
    cfg = clip_run(str(tmp_path / "store"), filter_model="ViT-B-32/openai",
                   multilingual_filter_model="xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k")
    # LAION's thresholds hold for LAION's models.
    assert (cfg.clip.min_similarity_en, cfg.clip.min_similarity_other) == (0.28, 0.26)
    with pytest.raises(ModelNotAvailable, match="ViT-B-32/openai"):
        execute(ClipStage(cfg), store, 0)
    assert store.marker("clip", 0) is None and store.list("clip") == []
