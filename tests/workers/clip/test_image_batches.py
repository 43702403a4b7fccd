"""The GPU preprocessing arithmetic, run on CPU tensors: it must give what the model's own
(PIL) preprocess gives, so GPU decoding changes speed, not similarities."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from clipfleet.shared.models.runtime import encoder
from clipfleet.workers.image_batches import gpu_transform_params, resize_crop_normalize
from tests.workers.clip.test_stage import tar_images
from tests.workers.clip.conftest import copy_images


@pytest.fixture(scope="module")
def jpegs(downloaded, tmp_path_factory) -> list[bytes]:
    store = copy_images(downloaded, str(tmp_path_factory.mktemp("batches") / "store"), shards=(0,))
    return list(tar_images(store, 0).values())[:48]


def test_tensor_preprocessing_matches_the_models_pil_preprocess(jpegs):
    import open_clip
    # shapes (64 px, from 256 px images: a 4x downscale) and CLIP's own 224 px transform.
    for preprocess in (encoder("shapes", "cpu", "fp32").preprocess, open_clip.image_transform(224, is_train=False)):
        params = gpu_transform_params(preprocess, device="cpu")
        assert params is not None
        diffs = []
        for data in jpegs:
            ours = resize_crop_normalize(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                     mode=ImageReadMode.RGB), params)
            theirs = preprocess(Image.open(io.BytesIO(data)))
            assert ours.shape == theirs.shape
            diffs.append(float((ours - theirs).abs().mean()))
        assert np.mean(diffs) < 0.02  # in normalised units (one grey level is ~0.015)


def test_tensor_preprocessing_leaves_similarities_within_001(jpegs, downloaded):
    enc = encoder("shapes", "cpu", "fp32")
    params = gpu_transform_params(enc.preprocess, device="cpu")
    ours = torch.stack([resize_crop_normalize(decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8),
                                                          mode=ImageReadMode.RGB), params) for d in jpegs])
    theirs = torch.stack([enc.preprocess(Image.open(io.BytesIO(d))) for d in jpegs])
    texts = enc.texts(["a red circle on a plain background", "a blue star on a striped background"])
    difference = (enc.images(ours) @ texts.T - enc.images(theirs) @ texts.T).abs().max()
    assert float(difference) <= 0.01


def test_a_preprocess_that_is_not_clips_eval_transform_keeps_the_cpu_path():
    from torchvision import transforms as T
    assert gpu_transform_params(T.Compose([T.RandomResizedCrop(64), T.ToTensor()]), device="cpu") is None


def test_both_paths_give_the_model_the_picture_without_its_letterbox(letterboxed, tmp_path):
    """GPU path arithmetic (on CPU tensors) and the PIL path cut the same box off a `border`
    image and agree; the model sees something else than the padded square."""
    from concurrent.futures import ThreadPoolExecutor

    from clipfleet.shared.images import picture_chw
    from clipfleet.workers.image_batches import CpuPreprocess
    from clipfleet.workers.image_reader import downloaded_samples, read_rows

    store = copy_images(letterboxed, str(tmp_path / "store"), shards=(0,))
    enc = encoder("shapes", "cpu", "fp32")
    params = gpu_transform_params(enc.preprocess, device="cpu")
    wide = [s for s in downloaded_samples(store, 0, read_rows(store, 0))
            if s.row["original_width"] / s.row["original_height"] > 1.6][:16]
    assert len(wide) == 16
    with ThreadPoolExecutor(1) as pool:
        cpu = CpuPreprocess(enc, pool, "border")
        for sample in wide:
            pil = cpu._pixels(sample)
            tensor = decode_jpeg(torch.frombuffer(bytearray(sample.data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            cut = picture_chw(tensor, sample.row, "border")
            assert cut.shape[2] == 256 and cut.shape[1] < 160  # the strip, not the square
            assert float((resize_crop_normalize(cut, params) - pil).abs().mean()) < 0.02
            padded = enc.preprocess(Image.open(io.BytesIO(sample.data)))
            assert float((padded - pil).abs().mean()) > 0.1
