"""The picture's box inside a stored image, checked against what the download stage really
stores in each resize mode: inside the box only picture, outside it only padding."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipfleet.shared.images import content_box, picture, row_box
from clipfleet.workers.download.options import RESIZE_MODES, DownloadOptions
from clipfleet.workers.download.resize import resize_image

COLOUR = (40, 90, 200)
SIZES = [(500, 200), (200, 400), (300, 300), (333, 101), (101, 333), (1000, 999), (640, 256), (90, 60)]


def stored(size: tuple[int, int], **options):
    """(stored RGB pixels, ResizedImage) of a solid picture of `size`, as the download stores it."""
    out = io.BytesIO()
    Image.new("RGB", size, COLOUR).save(out, "PNG")
    resized = resize_image(out.getvalue(), DownloadOptions(encode_format="png", encode_quality=1, **options))
    pixels = np.asarray(Image.open(io.BytesIO(resized.data)).convert("RGB"))
    return pixels, resized


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("only_if_bigger", [False, True])
def test_the_box_holds_the_picture_and_nothing_else(mode, size, only_if_bigger):
    pixels, r = stored(size, resize_mode=mode, image_size=256, resize_only_if_bigger=only_if_bigger)
    box = content_box(r.width, r.height, r.original_width, r.original_height, mode)
    left, top, right, bottom = box or (0, 0, r.width, r.height)
    inside = pixels[top:bottom, left:right].reshape(-1, 3)
    assert np.abs(inside.astype(int) - COLOUR).max() <= 1  # no white row or column is left in
    outside = np.ones(pixels.shape[:2], bool)
    outside[top:bottom, left:right] = False
    assert (pixels[outside] == 255).all()  # and no picture is cut off
    padded = mode == "border" and (r.width, r.height) != (r.original_width, r.original_height) \
        and round(min(size) * 256 / max(size)) < 256
    assert (box is not None) == padded, (box, r)


def test_a_wide_border_image_is_cut_to_its_strip():
    pixels, r = stored((500, 200), resize_mode="border", image_size=256)
    row = {"width": r.width, "height": r.height, "original_width": 500, "original_height": 200}
    assert content_box(256, 256, 500, 200, "border") == (0, 77, 256, 179)  # 256 x 102, centred
    image = Image.fromarray(pixels)
    assert picture(image, row, "border").size == (256, 102)
    assert picture(image, row, "keep_ratio").size == (256, 256)  # the run says there is no padding


def test_rows_that_cannot_tell_leave_the_image_whole():
    row = {"width": 256, "height": 256, "original_width": 500, "original_height": 200}
    assert row_box(row, (256, 256), "border") == (0, 77, 256, 179)
    assert row_box(row, (300, 256), "border") is None  # the pixels are not the row's image
    assert row_box({**row, "original_width": None}, (256, 256), "border") is None
    assert row_box({}, (256, 256), "border") is None
    assert content_box(256, 256, 0, 200, "border") is None
    assert content_box(256, 256, 500, 200, None) is None
