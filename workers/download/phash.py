"""Perceptual hashes: a 64-bit pHash (imagehash's) of the picture download has already decoded.

pHash (DCT of a 32x32 grey thumbnail, low 8x8 coefficients against their median) stays within a
few bits for a re-encoded, resized or lightly cropped copy, while distinct pictures differ in ~32.
A hash is 16 hex digits, as imagehash prints it; lists match within a Hamming distance.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import scipy.fftpack

from clipfleet.workers.download.options import PHASH_DISTANCE

HASH_SIDE = 32  # pHash's thumbnail: 4x the 8x8 hash, as imagehash's highfreq_factor
FITTED = 256  # download's default --image-size: a file is hashed at the size download hashes it
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def phash_bgr(img: np.ndarray) -> str:
    """pHash of a decoded 8-bit BGR picture. The thumbnail is made by OpenCV's area average (a
    fraction of Pillow's Lanczos from a full-size picture); then imagehash.phash's own steps on it
    (scipy's DCT on rows and columns, the low 8x8 against their median), called directly: through
    imagehash, its PIL round trip was 40% of the hash's time. The bits are imagehash's
    (tests/workers/download/test_phash.py holds them equal)."""
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    thumb = cv2.resize(grey, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA).astype(np.float64)
    low = scipy.fftpack.dct(scipy.fftpack.dct(thumb, axis=0), axis=1)[:8, :8]
    return np.packbits(low > np.median(low)).tobytes().hex()  # row by row, as str(ImageHash) prints them


def phash_bytes(data: bytes) -> str:
    """pHash of an encoded image (an evaluation set's, a takedown list's), decoded as download does."""
    from clipfleet.workers.download.resize import decode_bgr, sniff
    header = sniff(data)
    width, height = header.size
    scale = min(1.0, FITTED / max(width, height))
    return phash_bgr(decode_bgr(data, header.format, width, height,
                                (max(1, round(width * scale)), max(1, round(height * scale)))))


def to_int(phash: str) -> int:
    return int(phash, 16)


def distances(hashes: np.ndarray, phash: str) -> np.ndarray:
    """Hamming distances from `phash` to each of `hashes` (uint64)."""
    x = np.bitwise_xor(hashes, np.uint64(to_int(phash)))
    return _POPCOUNT[x.view(np.uint8)].reshape(-1, 8).sum(axis=1)


class PhashList:
    """Hashes, each with the distance within which a picture matches it."""

    def __init__(self, entries: dict[str, int] | None = None):
        self.entries = dict(entries or {})
        self._names = list(self.entries)
        self._hashes = np.array([to_int(h) for h in self.entries], np.uint64)
        self._limits = np.array(list(self.entries.values()), np.int64)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def match(self, phash: str | None) -> str | None:
        """The listed hash `phash` is near enough to, if any (the nearest)."""
        if not phash or not self.entries:
            return None
        d = distances(self._hashes, phash)
        near = np.flatnonzero(d <= self._limits)
        return self._names[near[np.argmin(d[near])]] if len(near) else None

    @classmethod
    def load(cls, source: str, distance: int = PHASH_DISTANCE) -> "PhashList":
        """A folder of images (hashed here), or a parquet with a `phash` column."""
        path = Path(source)
        if path.is_dir():
            from clipfleet.workers.download.resize import ImageRejected
            hashes = []
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                try:
                    hashes.append(phash_bytes(file.read_bytes()))
                except ImageRejected:  # a README or a label file beside the images
                    continue
        else:
            import pyarrow.parquet as pq
            hashes = [h.lower() for h in pq.read_table(source, columns=["phash"]).column("phash").to_pylist() if h]
        return cls({h: distance for h in hashes})
