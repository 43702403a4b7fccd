"""Decode, preprocess and batch samples beside the model, never in its way: the clip and embed
stages both read their shards through this and image_reader.py.

A background thread reads the shard (workers/image_reader.py) and hands each image to a
decode pool as it arrives; when a model's bucket is full it stacks the pixels, tokenizes the
captions and puts the batch in a short queue. The stage's own thread only runs the model, so
reading, decoding, tokenizing and the forward pass of the previous batch all overlap.

On CPU the pool has a thread per eight cores, beside the model's (shared/models/runtime.split_threads).
On CUDA, JPEGs are decoded on the GPU in batches (`torchvision.io.decode_jpeg(device="cuda")`)
and resized, cropped and normalised there: CPU preprocessing is what held clip-retrieval back
on GPUs. Other formats, and JPEGs nvjpeg refuses, take the CPU path.

Both paths first cut the picture out of the download's letterbox (shared/images.py: `border`
mode pads a wide image to a square) and give the model its own preprocessing of the picture
alone. The CPU path applies the model's preprocess to that PIL image, so what the stage computes
is exactly what a direct model call on the picture computes.
"""
from __future__ import annotations

import io
import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from clipfleet.shared.images import picture, picture_chw
from clipfleet.workers.image_reader import Sample

log = logging.getLogger("clipfleet.clip")


class Undecodable(Exception):
    """The stored bytes are not an image PIL (or nvjpeg) can decode."""


def decode_pil(data: bytes):
    from PIL import Image
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not inside the transform
        return image
    except Exception as exc:  # PIL raises many kinds for bad bytes; each means "undecodable"
        raise Undecodable(f"{exc.__class__.__name__}: {exc}") from exc


@dataclass
class Batch:
    """Samples of one model ready for its forward pass; `failed` are (sample, reason)."""
    model: str
    samples: list[Sample]
    pixels: object            # torch tensor (n, 3, H, W), float32
    tokens: object            # torch tensor (n, context)
    failed: list[tuple[Sample, str]] = field(default_factory=list)


class CpuPreprocess:
    """The model's own preprocess on the picture (PIL), in the decode pool. `resize_mode` is how
    the download stored the images (the run's --resize-mode): it says where padding may be."""

    def __init__(self, encoder, pool: ThreadPoolExecutor, resize_mode: str | None = None):
        self.encoder, self.pool, self.resize_mode = encoder, pool, resize_mode

    def _pixels(self, sample: Sample):
        return self.encoder.preprocess(picture(decode_pil(sample.data), sample.row, self.resize_mode))

    def submit(self, sample: Sample) -> Future | None:
        return self.pool.submit(self._pixels, sample)

    def _gather(self, pending: list[tuple[Sample, Future]]):
        """(decoded samples, their pixel tensors, failures) once the pool is done with them."""
        ok, tensors, failed = [], [], []
        for sample, future in pending:
            try:
                tensors.append(future.result())
                ok.append(sample)
            except Undecodable as exc:
                failed.append((sample, str(exc)))
        return ok, tensors, failed

    def finish(self, name: str, pending: list[tuple[Sample, Future]]) -> Batch:
        import torch
        ok, tensors, failed = self._gather(pending)
        if not ok:
            return Batch(name, [], None, None, failed)
        return Batch(name, ok, torch.stack(tensors), self.encoder.tokens([s.caption for s in ok]), failed)


class CudaJpegPreprocess(CpuPreprocess):
    """JPEGs decoded, resized, cropped and normalised on the GPU, a batch at a time.

    The transform is read off the model's preprocess (Resize shortest side, CenterCrop,
    Normalize); a model whose preprocess is anything else keeps the CPU path for all images.
    Bicubic resizing with antialiasing on the GPU differs from PIL's by rounding only
    (bench/gpu.py prints the largest similarity difference)."""

    def __init__(self, encoder, pool: ThreadPoolExecutor, resize_mode: str | None = None):
        super().__init__(encoder, pool, resize_mode)
        self.params = gpu_transform_params(encoder.preprocess, device="cuda")

    def submit(self, sample: Sample) -> Future | None:
        if self.params is None or not sample.data.startswith(b"\xff\xd8"):
            return super().submit(sample)
        return None  # decoded in finish(), with the rest of its batch

    def finish(self, name: str, pending: list[tuple[Sample, Future | None]]) -> Batch:
        import torch
        jpegs = [s for s, f in pending if f is None]
        decoded = decode_jpegs_on_gpu([s.data for s in jpegs]) if jpegs else []
        # What nvjpeg refuses goes to PIL, which decides whether it is an image at all.
        cpu_items = [(s, f) for s, f in pending if f is not None]
        cpu_items += [(s, CpuPreprocess.submit(self, s)) for s, image in zip(jpegs, decoded) if image is None]
        ok, tensors, failed = self._gather(cpu_items)
        parts = [torch.stack(tensors).pin_memory().to("cuda", non_blocking=True)] if tensors else []
        on_gpu = [(s, image) for s, image in zip(jpegs, decoded) if image is not None]
        if on_gpu:
            parts.append(torch.stack([resize_crop_normalize(picture_chw(image, s.row, self.resize_mode), self.params)
                                      for s, image in on_gpu]))
        samples = ok + [s for s, _ in on_gpu]
        if not samples:
            return Batch(name, [], None, None, failed)
        return Batch(name, samples, torch.cat(parts), self.encoder.tokens([s.caption for s in samples]), failed)

def gpu_transform_params(preprocess, device: str = "cuda"):
    """(size, interpolation, mean, std) when `preprocess` is Resize(shortest) -> CenterCrop ->
    to tensor -> Normalize, the CLIP eval transform; None otherwise."""
    import torch
    from torchvision import transforms as T
    steps = list(getattr(preprocess, "transforms", []))
    resize = next((t for t in steps if isinstance(t, T.Resize)), None)
    crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
    norm = next((t for t in steps if isinstance(t, T.Normalize)), None)
    if resize is None or crop is None or norm is None or not isinstance(resize.size, int):
        return None
    modes = {T.InterpolationMode.BICUBIC: "bicubic", T.InterpolationMode.BILINEAR: "bilinear"}
    if resize.interpolation not in modes or tuple(crop.size) != (resize.size, resize.size):
        return None
    return (resize.size, modes[resize.interpolation],
            torch.tensor(norm.mean, device=device), torch.tensor(norm.std, device=device))


def resize_crop_normalize(image, params):
    """torchvision's Resize(shortest side) -> CenterCrop -> ToTensor -> Normalize, on a uint8
    CHW tensor where it lies (the GPU), with the same crop arithmetic as CenterCrop."""
    import torch
    size, interpolation, mean, std = params
    _, h, w = image.shape
    # torchvision's arithmetic: the short side becomes `size`, the long one is truncated.
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = image.unsqueeze(0).float()
    if (new_h, new_w) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode=interpolation,
                                            antialias=True, align_corners=False)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = x[0, :, top:top + size, left:left + size].clamp(0, 255).round() / 255.0
    return (x - mean[:, None, None]) / std[:, None, None]


def decode_jpegs_on_gpu(blobs: list[bytes]) -> list:
    """RGB uint8 CHW tensors on the GPU, None where nvjpeg refused a file."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        return list(decode_jpeg(tensors, device="cuda", mode=ImageReadMode.RGB))
    except RuntimeError:  # one bad file fails the batch call: decode one by one
        out = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, device="cuda", mode=ImageReadMode.RGB))
            except RuntimeError:
                out.append(None)
        return out


def _one_torch_thread() -> None:
    # A new thread's OpenMP team would span every core and fight the model's threads; a
    # decode thread's few tensor ops (ToTensor, Normalize) need no team.
    import torch
    torch.set_num_threads(1)


def decode_pool(threads: int, name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=_one_torch_thread)


def preprocessor(encoder, pool: ThreadPoolExecutor, gpu_decode: bool = True, resize_mode: str | None = None):
    """`resize_mode`: the run's --resize-mode, so a letterbox is cut off (None: images hold no padding)."""
    if encoder.device == "cuda" and gpu_decode:
        return CudaJpegPreprocess(encoder, pool, resize_mode)
    return CpuPreprocess(encoder, pool, resize_mode)


_DONE = object()


def prepared_batches(samples: Iterable[Sample], route: Callable[[Sample], str],
                     preprocessors: dict, batch_size: int, depth: int = 2) -> Iterator[Batch]:
    """Batches per model in the background; `route(sample)` names the sample's model.

    At most `depth` batches wait ready, so the reader runs ahead of the model by a bounded
    amount of memory. An error in the background (the store went away) is raised here."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            _one_torch_thread()  # it stacks and tokenizes beside the model's threads
            pending: dict[str, list] = {name: [] for name in preprocessors}
            for sample in samples:
                if stop.is_set():
                    return
                name = route(sample)
                pending[name].append((sample, preprocessors[name].submit(sample)))
                if len(pending[name]) >= batch_size:
                    if not put(preprocessors[name].finish(name, pending[name])):
                        return
                    pending[name] = []
            for name, items in pending.items():
                if items and not put(preprocessors[name].finish(name, items)):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the stage's thread, which raises it
            put(exc)

    thread = threading.Thread(target=produce, name="clip-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)
