"""Decode, resize and encode one image: img2dataset's modes and checks, sniffing, pixel limit."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from clipfleet.workers.download.options import DownloadOptions
from clipfleet.workers.download.resize import ImageRejected, resize_image


def encoded(width: int, height: int, fmt: str = "JPEG", mode: str = "RGB", color=(200, 30, 30)) -> bytes:
    img = Image.new(mode, (width, height), color if mode != "L" else 120)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("mode, source, expected", [
    ("border", (800, 400), (256, 256)),
    ("keep_ratio", (800, 400), (512, 256)),
    ("keep_ratio_largest", (800, 400), (256, 128)),
    ("center_crop", (800, 400), (256, 256)),
    ("no", (800, 400), (800, 400)),
    ("border", (100, 50), (256, 256)),        # upscaled, as img2dataset does by default
    ("keep_ratio", (3000, 2000), (384, 256)),  # decoded at a reduced JPEG scale first
])
def test_resize_modes_give_img2datasets_sizes(mode, source, expected):
    out = resize_image(encoded(*source), DownloadOptions(resize_mode=mode))
    assert (out.width, out.height) == expected
    assert (out.original_width, out.original_height) == source
    assert decoded(out.data).shape[:2] == (expected[1], expected[0])


def test_border_pads_with_white_around_the_centred_image():
    out = decoded(resize_image(encoded(800, 400, color=(0, 0, 0)), DownloadOptions()).data)
    assert out[5, 128].min() > 240 and out[250, 128].min() > 240   # white bands top and bottom
    assert out[128, 128].max() < 15                                # the black image in the middle


def test_alpha_is_composited_on_white_and_grey_becomes_three_channels():
    transparent = encoded(300, 300, "PNG", "RGBA", (0, 0, 0, 0))
    out = decoded(resize_image(transparent, DownloadOptions()).data)
    assert out.shape == (256, 256, 3) and out.min() > 240
    grey = decoded(resize_image(encoded(300, 300, mode="L"), DownloadOptions()).data)
    assert grey.shape == (256, 256, 3)


@pytest.mark.parametrize("fmt, magic", [("jpg", b"\xff\xd8"), ("png", b"\x89PNG"), ("webp", b"RIFF")])
def test_encode_formats(fmt, magic):
    quality = 3 if fmt == "png" else 80
    out = resize_image(encoded(300, 200, "WEBP"), DownloadOptions(encode_format=fmt, encode_quality=quality))
    assert out.data.startswith(magic)


def test_gif_is_decoded_through_pillow():
    out = resize_image(encoded(300, 200, "GIF", "P"), DownloadOptions())
    assert (out.width, out.height) == (256, 256)


@pytest.mark.parametrize("data, keyword", [
    (b"<!DOCTYPE html><html><body>nope</body></html>", "not an image"),
    (b"", "not an image"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "not an image"),
    (encoded(640, 480)[:300], "decode"),
])
def test_content_is_sniffed_not_trusted(data, keyword):
    with pytest.raises(ImageRejected, match=keyword):
        resize_image(data, DownloadOptions())


def test_pixel_limit_is_checked_on_the_header_before_decoding(monkeypatch):
    data = encoded(1000, 1000, "PNG")
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded an image over the pixel limit"))
    with pytest.raises(ImageRejected, match="too many pixels"):
        resize_image(data, DownloadOptions(max_image_pixels=999_999))


def test_min_size_and_aspect_ratio_use_img2datasets_messages():
    with pytest.raises(ImageRejected, match="image too small"):
        resize_image(encoded(100, 300), DownloadOptions(min_image_size=200))
    with pytest.raises(ImageRejected, match="aspect ratio too large"):
        resize_image(encoded(900, 100), DownloadOptions(max_aspect_ratio=3))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="--resize-mode"):
        DownloadOptions(resize_mode="stretch")
    with pytest.raises(ValueError, match="--encode-format"):
        DownloadOptions(encode_format="gif")


@pytest.mark.parametrize("mode, source, expected", [
    ("border", (100, 50), (100, 50)),         # fits: no enlarging and no border
    ("border", (800, 400), (256, 256)),       # too big: resized and padded as usual
    ("keep_ratio", (300, 200), (300, 200)),   # the smaller side already fits
    ("keep_ratio", (800, 400), (512, 256)),
    ("center_crop", (250, 900), (250, 900)),  # img2dataset does not crop one that fits either
    ("keep_ratio_largest", (256, 100), (256, 100)),
])
def test_resize_only_if_bigger_leaves_an_image_that_fits_as_it_is(mode, source, expected):
    out = resize_image(encoded(*source), DownloadOptions(resize_mode=mode, resize_only_if_bigger=True))
    assert (out.width, out.height) == expected
    assert decoded(out.data).shape[:2] == (expected[1], expected[0])


def test_skip_reencode_keeps_the_bytes_only_when_not_resized_and_already_in_the_format():
    small_jpeg = encoded(200, 100)
    opts = DownloadOptions(resize_only_if_bigger=True, skip_reencode=True)
    assert resize_image(small_jpeg, opts).data == small_jpeg
    assert resize_image(small_jpeg, DownloadOptions(resize_mode="no", skip_reencode=True)).data == small_jpeg
    assert resize_image(small_jpeg, DownloadOptions(resize_only_if_bigger=True)).data != small_jpeg  # no skip asked
    big_jpeg = encoded(800, 400)
    assert resize_image(big_jpeg, opts).width == 256  # resized, so encoded anew
    small_png = encoded(200, 100, "PNG")
    assert resize_image(small_png, opts).data.startswith(b"\xff\xd8")  # another format: encoded as jpg
    png_opts = DownloadOptions(resize_only_if_bigger=True, skip_reencode=True, encode_format="png", encode_quality=3)
    assert resize_image(small_png, png_opts).data == small_png
    transparent = encoded(200, 100, "PNG", "RGBA", (0, 0, 0, 0))
    flattened = resize_image(transparent, png_opts).data
    assert flattened != transparent and decoded(flattened).shape == (100, 200, 3)  # composited on white
    with pytest.raises(ImageRejected, match="decode"):
        resize_image(small_jpeg[:200], opts)  # kept bytes are still checked by a decode


def test_resize_only_if_bigger_and_skip_reencode_agree_with_img2dataset():
    from img2dataset.resizer import Resizer
    for mode in ("border", "keep_ratio", "center_crop"):
        theirs = Resizer(image_size=256, resize_mode=mode, resize_only_if_bigger=True, skip_reencode=True)
        ours = DownloadOptions(resize_mode=mode, resize_only_if_bigger=True, skip_reencode=True)
        for source in [encoded(200, 100), encoded(300, 200), encoded(800, 400), encoded(200, 100, "PNG")]:
            data, width, height, *_, error = theirs(io.BytesIO(source))
            out = resize_image(source, ours)
            assert error is None and (out.width, out.height) == (width, height), (mode, width, height)
            assert (out.data == source) == (data == source), (mode, width, height)
