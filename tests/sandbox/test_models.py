"""The shipped `shapes` model: loads offline, small enough, and means something.

These tests never train; they check the files in shared/models/shapes/.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from clipfleet.producer.cli import main
from clipfleet.shared.models import (SHAPES_DIR, ModelNotAvailable, load_clip, load_tag_heads,
                           score_tags, shipped_models)
from clipfleet.sandbox.evaluate import evaluate_model

# A fresh sample: its seed is not one training or the shipped metrics used.
FRESH_SEED = 4242


@pytest.fixture(scope="module")
def shapes():
    return load_clip("shapes")


@pytest.fixture(scope="module")
def fresh_evaluation():
    return evaluate_model("shapes", per_class=4, seed=FRESH_SEED)


def test_shipped_folder_is_complete_and_small():
    names = {p.name for p in SHAPES_DIR.iterdir()}
    assert {"open_clip_config.json", "weights.npz", "heads.npz", "metrics.json",
            "README.md"} <= names
    assert sum(p.stat().st_size for p in SHAPES_DIR.iterdir() if p.is_file()) <= 20 * 1024 ** 2
    assert "shapes" in shipped_models()


def test_shapes_loads_offline_and_embeds(shapes):
    model, preprocess, tokenizer = shapes
    assert not model.training
    from PIL import Image
    pixels = preprocess(Image.new("RGB", (300, 200), (200, 30, 30)))
    assert pixels.shape == (3, 64, 64)
    tokens = tokenizer(["a red circle", "красная звезда на полосатом фоне"])
    assert tokens.shape == (2, 128)
    with torch.no_grad():
        image = model.encode_image(pixels[None], normalize=True)
        text = model.encode_text(tokens, normalize=True)
    assert image.shape == (1, 128) and text.shape == (2, 128)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-4)


def test_zero_shot_accuracy_reaches_target(fresh_evaluation):
    zero_shot = fresh_evaluation["zero_shot"]
    for language in ("en", "fr", "de", "es", "ru", "zh", "ja"):
        assert zero_shot[language] >= 0.9, (language, zero_shot)


def test_matched_pairs_are_clearly_above_mismatched(fresh_evaluation):
    cosine = fresh_evaluation["cosine"]
    assert cosine["matched"] - cosine["mismatched"] >= 0.2, cosine
    assert cosine["matched_above_mismatched"] >= 0.95, cosine


def test_tag_heads_detect_watermark_and_unsafe(fresh_evaluation):
    for tag, scores in fresh_evaluation["tag_heads"].items():
        assert scores["roc_auc"] >= 0.9, (tag, scores)
        assert scores["accuracy"] >= 0.85, (tag, scores)


def test_the_aesthetic_head_ranks_the_stand_in_rating(fresh_evaluation):
    assert fresh_evaluation["aesthetic_head"]["spearman"] >= 0.8, fresh_evaluation["aesthetic_head"]


def test_tag_heads_give_probabilities(shapes):
    heads = load_tag_heads("shapes")
    assert set(heads) == {"watermark", "unsafe"}
    embeddings = np.random.default_rng(0).normal(size=(5, 128)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    for tag, probability in score_tags(heads, embeddings).items():
        assert probability.shape == (5,) and ((0 <= probability) & (probability <= 1)).all()


def test_shipped_metrics_record_the_targets():
    metrics = json.loads((SHAPES_DIR / "metrics.json").read_text())
    assert metrics["evaluation"]["zero_shot"]["en"] >= 0.9
    assert set(metrics["tag_heads_held_out"]) == {"watermark", "unsafe", "aesthetic"}
    assert metrics["tag_heads_held_out"]["aesthetic"]["spearman"] >= 0.8
    assert 0 < metrics["suggested_min_similarity"] < 1


def test_missing_weights_name_the_model_and_never_download(tmp_path):
    with pytest.raises(ModelNotAvailable, match=r"ViT-B-32/openai.*never\s+download.*clipfleet models fetch ViT-B-32/openai"):
        load_clip("ViT-B-32/openai", cache_dir=str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="hf-hub:nobody/nothing"):
        load_clip("hf-hub:nobody/nothing", cache_dir=str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="not-a-model"):
        load_clip("not-a-model")
    with pytest.raises(ModelNotAvailable, match="pretrained tag"):
        load_clip("ViT-B-32/no-such-tag")


def test_a_folder_without_weights_is_refused_not_randomised(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(
        (SHAPES_DIR / "open_clip_config.json").read_text())
    with pytest.raises(ModelNotAvailable, match="no .safetensors"):
        load_clip(str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="no tag heads"):
        load_tag_heads(str(tmp_path))


def test_an_open_clip_checkpoint_directory_loads(tmp_path, shapes):
    """A local checkpoint in open_clip's own layout (config + safetensors) loads by path."""
    from safetensors.torch import save_file

    model, _, _ = shapes
    (tmp_path / "open_clip_config.json").write_text(
        (SHAPES_DIR / "open_clip_config.json").read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "open_clip_model.safetensors")
    loaded, preprocess, tokenizer = load_clip(str(tmp_path))
    tokens = tokenizer(["a blue star"])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-5)


def test_models_cli_lists_and_evaluates(capsys):
    assert main(["models", "list"]) == 0
    assert capsys.readouterr().out.startswith("shapes")
    assert main(["models", "eval", "--model", "shapes", "--per-class", "1"]) == 0
    out = capsys.readouterr().out
    assert "zero-shot accuracy over 48 colour x shape classes" in out
    assert "matched" in out and "mismatched" in out
    assert "tag head watermark" in out and "tag head unsafe" in out and "aesthetic head  Spearman" in out
