"""The picture inside a stored image: undo the download's letterbox before a model sees it.

img2dataset's default resize mode, `border`, fits the long side to --image-size and pads the
short one with white to a square, so a 2.5:1 picture is stored as a strip filling 40% of its
square. A CLIP model was trained on crops of pictures, never on padding: shown the padded square
it sees a small strip and judges the padding too (on the sandbox, right captions of images wider
than 1.9:1 were kept 12% of the time, square ones 98%). The picture's box follows from the sizes
every image shard stores (width/height as stored, original_width/original_height as downloaded)
and the run's resize mode, with the download's own arithmetic (workers/download/resize.py):
the picture is scaled by the long side and centred, its offsets rounded down.

The other modes store no padding: keep_ratio and keep_ratio_largest keep the whole picture
(scaled), center_crop keeps its central square (what lies outside is gone), no keeps it as it was.
"""
from __future__ import annotations

from numbers import Integral

# The resize modes whose stored images hold padding around the picture.
LETTERBOX_MODES = ("border",)

Box = tuple[int, int, int, int]  # left, top, right, bottom, in stored pixels


def content_box(width, height, original_width, original_height, resize_mode: str | None) -> Box | None:
    """Where the picture lies in a stored `width` x `height` image; None when it fills the image
    (no padding, or sizes that cannot tell: a row without them)."""
    if resize_mode not in LETTERBOX_MODES:
        return None
    sizes = (width, height, original_width, original_height)
    if any(not isinstance(v, Integral) or v <= 0 for v in sizes):
        return None
    if width != height or (width, height) == (original_width, original_height):
        return None  # border pads to a square canvas; an image left as it was has no padding
    scale = min(width / original_width, height / original_height)
    inner_w = max(1, round(original_width * scale))
    inner_h = max(1, round(original_height * scale))
    if inner_w >= width and inner_h >= height:
        return None
    left, top = (width - inner_w) // 2, (height - inner_h) // 2
    return left, top, left + inner_w, top + inner_h


def row_box(row: dict, size: tuple[int, int], resize_mode: str | None) -> Box | None:
    """The picture's box for an image shard's row, decoded at `size` (width, height). None when
    the decoded size is not the row's stored size: then the row does not describe these pixels."""
    if (row.get("width"), row.get("height")) != tuple(size):
        return None
    return content_box(row.get("width"), row.get("height"), row.get("original_width"),
                       row.get("original_height"), resize_mode)


def picture(image, row: dict, resize_mode: str | None):
    """A PIL image cut to the picture it holds (the image itself when there is no padding)."""
    box = row_box(row, image.size, resize_mode)
    return image if box is None else image.crop(box)


def picture_chw(tensor, row: dict, resize_mode: str | None):
    """The same for a CHW tensor (a GPU-decoded JPEG): a view of the picture's pixels."""
    box = row_box(row, (int(tensor.shape[-1]), int(tensor.shape[-2])), resize_mode)
    if box is None:
        return tensor
    left, top, right, bottom = box
    return tensor[:, top:bottom, left:right]


COPY_KINDS = ("q40", "half", "crop3")


def web_copies(bgr, quality: int = 40, scale: float = 0.5, crop: float = 0.03) -> dict[str, bytes]:
    """A picture (8-bit BGR array) as the web copies it, each a JPEG: re-encoded at `quality`,
    shrunk to `scale`, cropped by `crop` of each side (half at either end). The near-duplicate
    calibration measures how far a model and the perceptual hash move these; the tests plant them."""
    import cv2
    h, w = bgr.shape[:2]
    dy, dx = round(h * crop / 2), round(w * crop / 2)

    def jpeg(img, q=90):
        return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes()
    small = (max(1, round(w * scale)), max(1, round(h * scale)))
    return {"q40": jpeg(bgr, quality), "half": jpeg(cv2.resize(bgr, small, interpolation=cv2.INTER_AREA)),
            "crop3": jpeg(bgr[dy:h - dy, dx:w - dx])}
