"""Turning a query into an embedding with the run's own embed model, loaded once per process.

Text goes through the model's tokenizer and text tower; an uploaded image (base64) or an image
URL (fetched with the downloader's Fetcher: address guard, deadline, byte limit) is sniffed,
its pixel count checked on the header before decoding, then preprocessed as the embed stage
does. Every failure is a QueryError, which the service answers with a 400.
"""
from __future__ import annotations

import base64
import binascii
import threading

import numpy as np

from clipfleet.search.settings import ServeSettings
from clipfleet.shared.models.runtime import encode_texts


class QueryError(ValueError):
    """A query the service cannot answer as asked; the message says why (a 400)."""


def normalized(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


class Encoder:
    def __init__(self, model_name: str, settings: ServeSettings, threads: int = 1):
        from clipfleet.shared.models import load_clip
        import torch
        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.model_name = model_name
        self.settings = settings
        self.model, self.preprocess, self.tokenizer = load_clip(model_name)
        self._fetcher = None
        self._lock = threading.Lock()

    def text(self, text: str) -> np.ndarray:
        with self.torch.inference_mode():
            tokens = self.tokenizer([text])  # padded to 77; the text tower stops at its end
            return normalized(encode_texts(self.model, tokens).float().numpy())

    def image_bytes(self, data: bytes) -> np.ndarray:
        from PIL import Image
        from clipfleet.workers import download
        try:
            picture = download.sniff(data)
            download.check_size(picture.width, picture.height, self._download_options())
            picture = picture.convert("RGB")
        except download.ImageRejected as exc:
            raise QueryError(f"image: {exc}") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise QueryError(f"image: decode error: {exc}") from None
        with self.torch.inference_mode():
            pixels = self.preprocess(picture).unsqueeze(0)
            return normalized(self.model.encode_image(pixels).float().numpy())

    def image_base64(self, text: str) -> np.ndarray:
        if "," in text[:100] and text.startswith("data:"):
            text = text.split(",", 1)[1]  # a data: URL, as a browser's FileReader gives it
        try:
            data = base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise QueryError(f"image: not base64: {exc}") from None
        if not data:
            raise QueryError("image: empty")
        return self.image_bytes(data)

    def image_url(self, url: str) -> np.ndarray:
        from clipfleet.workers import download
        try:
            data = self.fetcher().fetch(url)
        except download.FetchFailed as exc:
            raise QueryError(f"image_url: {exc}") from None
        return self.image_bytes(data)

    def _download_options(self):
        from clipfleet.workers.download.options import DownloadOptions
        s = self.settings
        return DownloadOptions(allow_private_addresses=s.allow_private_image_urls,
                               download_timeout=s.image_url_timeout, download_retries=0,
                               max_image_bytes=s.max_image_bytes, max_image_pixels=s.max_image_pixels)

    def fetcher(self):
        with self._lock:
            if self._fetcher is None:
                from clipfleet.workers import download
                self._fetcher = download.Fetcher(self._download_options())
            return self._fetcher
