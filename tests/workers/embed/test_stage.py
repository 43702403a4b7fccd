"""The embed stage on filtered sandbox shards: clip-retrieval's layout, what a direct model call
gives, reuse of the filter's work, and the folder read by autofaiss and embedding-reader."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from clipfleet.shared import layout
from clipfleet.shared.models import load_clip
from clipfleet.shared.pipeline import execute
from clipfleet.shared.storage import Store
from clipfleet.workers.clip.stage import ClipStage
from clipfleet.workers.embed.stage import EmbedStage
from tests.workers.clip.conftest import SHARDS, clip_run, copy_images

FLOAT16_TOLERANCE = 2e-3  # float16 keeps ~3 significant digits of values below 1


def embed_shards(store_uri: str, downloaded, **options):
    copy_images(downloaded, store_uri)
    cfg = clip_run(store_uri, until="embed", **options)
    store = Store(store_uri)
    clip_markers = [execute(ClipStage(cfg), store, shard) for shard in SHARDS]
    embed_markers = [execute(EmbedStage(cfg), store, shard) for shard in SHARDS]
    return store, clip_markers, embed_markers


def npy(store: Store, rel: str) -> np.ndarray:
    return np.load(io.BytesIO(store.read_bytes(rel)))


def metadata(store: Store, shard: int) -> list[dict]:
    return pq.read_table(io.BytesIO(store.read_bytes(layout.embedding_metadata(shard)))).to_pylist()


def direct_embeddings(store: Store, shard: int, rows: list[dict]):
    """fp32 image and text embeddings from a plain model call on the stored files."""
    model, preprocess, tokenizer = load_clip("shapes")
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(layout.image_shard(shard)))) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(files[f"{r['key']}.jpg"]))) for r in rows])
        img = model.encode_image(pixels, normalize=True).numpy()
        text = model.encode_text(tokenizer([r["caption"] for r in rows]), normalize=True).numpy()
    return img, text


def test_embeddings_are_in_clip_retrievals_layout_and_equal_a_direct_model_call(store_uri, downloaded):
    # Different precisions for the two stages: the embed stage encodes everything itself.
    store, clip_markers, markers = embed_shards(store_uri, downloaded, embed_precision="fp32")
    assert store.list("embeddings") == ["img_emb", "metadata", "text_emb"]
    for shard, marker, clip_marker in zip(SHARDS, markers, clip_markers):
        img, text = npy(store, layout.image_embeddings(shard)), npy(store, layout.text_embeddings(shard))
        meta = metadata(store, shard)
        judged = pq.read_table(io.BytesIO(store.read_bytes(layout.clip_shard(shard)))).to_pylist()
        kept = sorted(r["key"] for r in judged if r["kept"])
        assert img.dtype == text.dtype == np.float16 and img.shape == text.shape == (len(kept), 128)
        assert [m["key"] for m in meta] == kept  # rows aligned with the .npy, key order
        assert list(meta[0]) == list(layout.EMBEDDING_METADATA_COLUMNS)
        np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1.0, atol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(text.astype(np.float32), axis=1), 1.0, atol=2e-3)

        sources = {r["key"]: r for r in downloaded.rows(shard)}
        similarity = {r["key"]: r["similarity"] for r in judged}
        for m in meta:
            src, truth = sources[m["key"]], downloaded.truth[sources[m["key"]]["url"]]
            assert (m["url"], m["caption"], m["language"]) == (src["url"], src["caption"], src["language"])
            assert (m["width"], m["height"]) == (truth["width"], truth["height"])  # the original size
            assert m["similarity"] == similarity[m["key"]]

        direct_img, direct_text = direct_embeddings(store, shard, meta)
        np.testing.assert_allclose(img.astype(np.float32), direct_img, atol=FLOAT16_TOLERANCE)
        np.testing.assert_allclose(text.astype(np.float32), direct_text, atol=FLOAT16_TOLERANCE)

        stats = marker["stats"]
        assert (stats["vectors"], stats["dim"], stats["encoded"]) == (len(kept), 128, len(kept))
        assert stats["precision"] == "fp32" and stats["samples_per_s"] > 0
        assert layout.clip_embeddings(shard) not in clip_marker["outputs"]


def test_when_filter_and_embed_models_agree_each_image_is_encoded_once(tmp_path, downloaded):
    settings = {"clip_precision": "fp32", "embed_precision": "fp32"}
    store, clip_markers, markers = embed_shards(str(tmp_path / "once"), downloaded, **settings)
    reference, _, _ = embed_shards(str(tmp_path / "twice"), downloaded, **settings, clip_threads=1)
    for shard, marker, clip_marker in zip(SHARDS, markers, clip_markers):
        assert layout.clip_embeddings(shard) in clip_marker["outputs"]
        stats = marker["stats"]
        assert stats["reused_from_clip"] == stats["vectors"] == clip_marker["stats"]["kept"]
        assert stats["encoded"] == 0
        for rel in (layout.image_embeddings(shard), layout.text_embeddings(shard)):
            np.testing.assert_allclose(npy(store, rel).astype(np.float32),
                                       npy(reference, rel).astype(np.float32), atol=FLOAT16_TOLERANCE)
        assert metadata(store, shard) == metadata(reference, shard)


def test_a_shard_that_keeps_nothing_writes_empty_aligned_files(tmp_path, downloaded):
    store, _, markers = embed_shards(str(tmp_path / "store"), downloaded, min_similarity_en=1.0,
                                     min_similarity_other=1.0)
    assert npy(store, layout.image_embeddings(0)).shape == (0, 128)
    assert npy(store, layout.text_embeddings(0)).shape == (0, 128)
    assert metadata(store, 0) == []
    assert (markers[0]["stats"]["vectors"], markers[0]["stats"]["dim"]) == (0, 128)


def test_autofaiss_and_embedding_reader_read_the_folder_as_it_is(tmp_path, downloaded):
    from autofaiss import build_index
    from embedding_reader import EmbeddingReader

    store, _, markers = embed_shards(str(tmp_path / "store"), downloaded)
    folder = store.path(layout.EMBEDDINGS)
    total = sum(m["stats"]["vectors"] for m in markers)
    index, _ = build_index(embeddings=f"{folder}/img_emb", index_path=str(tmp_path / "knn.index"),
                           index_infos_path=str(tmp_path / "infos.json"), max_index_memory_usage="64MB",
                           current_memory_available="1G", metric_type="ip", verbose=40)
    assert index.ntotal == total

    reader = EmbeddingReader(f"{folder}/img_emb", file_format="parquet_npy",
                             embedding_column="embedding", metadata_folder=f"{folder}/metadata",
                             meta_columns=["key", "caption"])
    assert reader.count == total
    read_keys = []
    for embeddings, meta in reader(batch_size=10_000, start=0, end=reader.count):
        read_keys += list(meta["key"])
        rows = {m["key"]: i for shard in SHARDS for i, m in enumerate(metadata(store, shard))}
        first = meta["key"].iloc[0]
        shard = 0 if first in {m["key"] for m in metadata(store, 0)} else 1
        np.testing.assert_array_equal(embeddings[0], npy(store, layout.image_embeddings(shard))[rows[first]])
    assert sorted(read_keys) == sorted(m["key"] for shard in SHARDS for m in metadata(store, shard))


def test_embeddings_of_letterboxed_images_are_those_of_the_picture(tmp_path, letterboxed):
    """Stored in `border` mode, a wide image is embedded as its picture: what the model gives on
    the strip cut out of the padding, not on the padded square."""
    from clipfleet.shared.images import picture
    from tests.workers.clip.conftest import ASPECT_SHARDS

    shard = ASPECT_SHARDS[0]
    store_uri = str(tmp_path / "store")
    copy_images(letterboxed, store_uri, shards=(shard,))
    # Different precisions: the embed stage encodes everything itself, no reuse of the filter's.
    cfg = clip_run(store_uri, until="embed", resize_mode="border", embed_precision="fp32")
    store = Store(store_uri)
    execute(ClipStage(cfg), store, shard)
    marker = execute(EmbedStage(cfg), store, shard)
    meta = metadata(store, shard)
    assert marker["stats"]["encoded"] == len(meta) >= 80

    rows = {r["key"]: r for r in letterboxed.rows(shard)}
    model, preprocess, _ = load_clip("shapes")
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(layout.image_shard(shard)))) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    images = [Image.open(io.BytesIO(files[f"{m['key']}.jpg"])) for m in meta]
    with torch.no_grad():
        cut = model.encode_image(torch.stack([preprocess(picture(i, rows[m["key"]], "border"))
                                              for i, m in zip(images, meta)]), normalize=True).numpy()
        padded = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True).numpy()
    img = npy(store, layout.image_embeddings(shard)).astype(np.float32)
    np.testing.assert_allclose(img, cut, atol=FLOAT16_TOLERANCE)
    wide = np.array([m["width"] / m["height"] > 1.6 for m in meta])
    assert wide.sum() >= 10
    assert float(np.abs(img[wide] - padded[wide]).max()) > 0.1  # the padded square is another picture
