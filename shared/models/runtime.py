"""A CLIP model as a worker runs it: on its device, in its precision, with the threads it owns.

`encoder(name, device, precision, threads)` loads a model once per process (the gpu-clip and
gpu-embed stages of one worker share it) and returns an `Encoder` that turns preprocessed
image batches and caption lists into L2-normalised float32 embeddings.

Precision "auto" means fp16 on CUDA, and on CPU bf16 when the CPU has native bf16 (AVX-512
BF16 / AMX; oneDNN then runs matmuls about 10x faster than fp32) *and* this model's image-text
similarities stay within `BF16_TOLERANCE` of fp32 on the first real batch the process sees
(its first `PROBE_SAMPLES` samples, every image against every caption); otherwise fp32. The
probe uses real data because a synthetic one is out of distribution and says little: `shapes`
moves by 0.02 on noise pictures and by 0.006 on sandbox images. bf16 runs under autocast, so
layer norms and softmax stay in fp32, which is what keeps the error small.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

from clipfleet.shared.models import load_clip

log = logging.getLogger("clipfleet.models")

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_TOLERANCE = 0.01  # largest |similarity(bf16) - similarity(fp32)| that still means "the same"
PROBE_SAMPLES = 16


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_device(requested: str = "auto") -> str:
    import torch
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device here")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def split_threads(device: str, requested: int = 0) -> tuple[int, int]:
    """(torch intra-op threads, decode threads). On CPU the model gets every core and decoding
    one thread per eight cores beside it: decoding and preprocessing a 256 px picture costs ~3%
    of a ViT-B/32 forward, so a core set aside for it mostly idled (on 2 cores the stage ran at
    half the bare forward's rate; bench.clip). On CUDA the model needs one thread to feed the
    GPU and decoding gets the others. `requested` torch threads leave the other cores to decoding."""
    cores = available_cores()
    if device == "cuda":
        model = requested or 1
        return model, max(1, cores - 1)
    if requested:
        return requested, max(1, cores - requested)
    return cores, max(1, cores // 8)


# glibc serves an allocation over its mmap threshold (32 MiB at most, as it adapts it) with a
# fresh mapping and unmaps it on free, so each forward pass faulted its large activations in
# again, page by page: ViT-B/32 at batch 64 (a 39 MB MLP activation) took ~250 000 page faults
# a batch and ran at 16.4 images/s fp32 on this project's 2-core machine, 18.6 with large
# blocks kept in the heap (same peak memory: the blocks are reused, not added).
HEAP_BLOCKS_UP_TO = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.lru_cache(maxsize=1)
def keep_large_blocks_in_heap() -> bool:
    """Ask the C library to keep freed blocks up to HEAP_BLOCKS_UP_TO for reuse instead of
    handing them back to the kernel. Once per process, on CPU; False where the C library has
    no mallopt (musl, macOS), which then works as before."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    kept = bool(mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO) and mallopt(_M_TRIM_THRESHOLD, HEAP_BLOCKS_UP_TO))
    if not kept:
        log.info("the C library refused mallopt: large activations are mapped afresh each batch")
    return kept


def cpu_has_bf16() -> bool:
    import torch
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Captions per text-tower call on CPU once a batch is sorted by length: 8 and 16 ran a batch of
# 64 sandbox captions (9 to 56 tokens) about 3x faster than the whole batch cut at its longest,
# 32 2.4x (bench.clip's shards, B/32, fp32 and bf16). On CUDA the batch stays whole: small
# calls would cost more in kernel launches than the padding they save.
TEXT_CHUNK_CPU = 16


def encode_texts(model, tokens, chunk: int | None = None):
    """model.encode_text(tokens) computed without the padding: each caption's embedding, in
    the batch's order, from calls of `chunk` captions of similar length (the whole batch when
    None), each run only up to its longest caption's pooled token.

    A causal text tower pools the end-of-text token's output, which depends on no position
    after it, so the padding after it changes nothing but costs its share of all 77 positions:
    on ViT-B/32 fp32 the text tower of a batch of 16-token captions took 0.53 s instead of
    2.97 s (the image tower: 3.7 s), with the same embeddings. With `chunk`, open_clip's plain
    blocks run packed (_encode_text_packed), others cut per chunk. Towers this does not know
    (Hugging Face ones, last-token or mean pooling) run as they are."""
    import torch
    pool = getattr(model, "text_pool_type", None)
    if pool not in ("argmax", "eos") or getattr(model, "attn_mask", None) is None \
            or not hasattr(model, "positional_embedding"):
        return model.encode_text(tokens)
    eos_id = getattr(model, "text_eos_id", None)
    pooled_at = tokens.argmax(dim=-1) if pool == "argmax" else (tokens == eos_id).int().argmax(dim=-1)
    if chunk is not None and _packable(model):
        return _encode_text_packed(model, tokens, pooled_at + 1, chunk)
    if chunk is None or len(tokens) <= chunk:
        return _encode_text_cut(model, tokens, int(pooled_at.max()) + 1)
    order = pooled_at.argsort()
    parts = []
    for start in range(0, len(order), chunk):
        rows = order[start:start + chunk]
        parts.append(_encode_text_cut(model, tokens[rows], int(pooled_at[rows].max()) + 1))
    out = parts[0].new_empty((len(tokens), parts[0].shape[1]))
    out[order] = torch.cat(parts)
    return out


def _encode_text_cut(model, tokens, length: int):
    """CLIP.encode_text on the first `length` positions of `tokens`."""
    import torch
    from open_clip.transformer import text_global_pool
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    mask = model.attn_mask[:length, :length].contiguous()
    x = model.ln_final(model.transformer(x, attn_mask=mask))
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    return _project_text(model, x)


def _project_text(model, pooled):
    import torch
    if model.text_projection is None:
        return pooled
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(pooled)
    return pooled @ model.text_projection


def _packable(model) -> bool:
    """Whether the text tower is open_clip's plain pre-norm blocks (layer norm, nn.MultiheadAttention
    with one packed in-projection, MLP), which _encode_text_packed computes piece by piece."""
    import torch
    from open_clip.transformer import ResidualAttentionBlock
    blocks = getattr(model.transformer, "resblocks", None)
    return bool(blocks) and all(
        type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
        and isinstance(block.attn, torch.nn.MultiheadAttention) and block.attn._qkv_same_embed_dim
        and block.attn.in_proj_weight is not None and block.attn.bias_k is None and not block.attn.add_zero_attn
        for block in blocks)


def _encode_text_packed(model, tokens, lengths, chunk: int):
    """CLIP.encode_text with no padding in the matmuls: each caption's first `lengths` tokens
    in one (total tokens, width) matrix, so every linear layer and layer norm runs on real
    tokens only, in calls as large as the batch. Attention alone needs captions apart: it runs
    on groups of `chunk` captions of similar length, each padded to its longest, with a causal
    mask, so no real token sees the padding after it. On ViT-B/32 fp32 (bench.clip's 256
    sandbox captions, 23 tokens on average) the text tower took 3.2 s instead of 4.5 s cut per
    chunk of 16, with the same embeddings."""
    import torch
    import torch.nn.functional as F
    n, device = len(tokens), tokens.device
    starts = torch.zeros(n, dtype=torch.long, device=device)
    starts[1:] = lengths.cumsum(0)[:-1]
    total = int(lengths.sum())
    caption = torch.repeat_interleave(torch.arange(n, device=device), lengths)
    position = torch.arange(total, device=device) - starts[caption]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[caption, position]).to(cast) + model.positional_embedding[position].to(cast)
    groups = []  # (packed rows as a padded grid, where the grid is real, their rows, captions, longest)
    order = lengths.argsort()
    for first in range(0, n, chunk):
        rows = order[first:first + chunk]
        longest = int(lengths[rows].max())
        step = torch.arange(longest, device=device)
        # A padded slot repeats its caption's last token: causal attention never lets a real one see it.
        grid = starts[rows, None] + torch.minimum(step[None, :], lengths[rows, None] - 1)
        real = step[None, :] < lengths[rows, None]
        groups.append((grid, real, grid[real], len(rows), longest))
    for block in model.transformer.resblocks:
        attn = block.attn
        heads, width = attn.num_heads, attn.embed_dim
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        mixed = qkv.new_empty((total, width))
        for grid, real, packed_rows, count, longest in groups:
            q, k, v = qkv[grid].view(count, longest, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            mixed[packed_rows] = out.transpose(1, 2).reshape(count, longest, width)[real]
        x = x + block.ls_1(attn.out_proj(mixed))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return _project_text(model, model.ln_final(x[starts + lengths - 1]))


_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


class Encoder:
    """A loaded CLIP model; `images()` and `texts()` return L2-normalised float32 tensors on
    the model's device."""

    def __init__(self, name: str, device: str, precision: str, threads: int):
        import torch
        self.name, self.device = name, device
        self.threads = threads
        if device == "cpu":
            torch.set_num_threads(threads)
            keep_large_blocks_in_heap()
        self.model, self.preprocess, self.tokenizer = load_clip(name, device=device)
        self.dim = int(self._output_dim())
        self.precision_note = ""
        self.precision = self._choose_precision(precision)

    def _output_dim(self) -> int:
        visual = self.model.visual
        dim = getattr(visual, "output_dim", None)
        if dim is None:  # every open_clip tower sets output_dim; measure if one does not
            import torch
            size = self.image_size
            with torch.no_grad():
                dim = self.model.encode_image(torch.zeros(1, 3, size, size, device=self.device)).shape[-1]
        return dim

    @property
    def image_size(self) -> int:
        size = getattr(self.model.visual, "image_size", 224)
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    # torch.no_grad, not inference_mode: measured on ViT-B/32, one core, CPU autocast bf16 ran
    # at 0.8 images/s under inference_mode (fp32: 2.2) and at 10.2 under no_grad (fp32: 3.9).
    def _autocast(self, precision: str | None = None):
        import torch
        precision = precision or self.precision
        if precision in (None, "fp32"):  # None: not settled yet, so exact
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=getattr(torch, _DTYPES[precision]))

    def _own_threads(self) -> None:
        # torch's thread count is per process; another encoder (or a floor bench) may have moved it.
        import torch
        if self.device == "cpu" and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def images(self, pixels, precision: str | None = None):
        import torch
        self._own_threads()
        with torch.no_grad(), self._autocast(precision):
            out = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def tokens(self, captions: list[str]):
        return self.tokenizer(list(captions))

    def texts(self, captions_or_tokens, precision: str | None = None):
        import torch
        self._own_threads()
        tokens = captions_or_tokens
        if not isinstance(tokens, torch.Tensor):
            tokens = self.tokens(tokens)
        with torch.no_grad(), self._autocast(precision):
            out = encode_texts(self.model, tokens.to(self.device, non_blocking=True),
                               TEXT_CHUNK_CPU if self.device == "cpu" else None)
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def pairs(self, pixels, tokens):
        """(image embeddings, text embeddings) of a batch; the first batch settles "auto"."""
        if self.precision is None:
            self._settle_precision(pixels[:PROBE_SAMPLES], tokens[:PROBE_SAMPLES])
        return self.images(pixels), self.texts(tokens)

    def _choose_precision(self, requested: str) -> str | None:
        if requested not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
        if requested != "auto":
            return requested
        if self.device == "cuda":
            return "fp16"
        if not cpu_has_bf16():
            self.precision_note = "fp32: this CPU has no native bf16"
            return "fp32"
        return None  # bf16 if the first batch agrees (pairs)

    def _settle_precision(self, pixels, tokens) -> None:
        deviation = self.bf16_deviation(pixels, tokens)
        if deviation <= BF16_TOLERANCE:
            self.precision = "bf16"
            self.precision_note = f"bf16: similarities within {deviation:.4f} of fp32 on the first batch"
        else:
            self.precision = "fp32"
            self.precision_note = (f"fp32: bf16 moved similarities by {deviation:.4f} "
                                   f"(> {BF16_TOLERANCE}) on the first batch")
        log.info("%s: %s", self.name, self.precision_note)

    def bf16_deviation(self, pixels, tokens) -> float:
        """Largest change bf16 makes to the similarities of every image with every caption."""
        exact = self.images(pixels, "fp32") @ self.texts(tokens, "fp32").T
        approx = self.images(pixels, "bf16") @ self.texts(tokens, "bf16").T
        return float((exact - approx).abs().max())


@functools.lru_cache(maxsize=4)
def encoder(name: str, device: str = "auto", precision: str = "auto", threads: int = 0) -> Encoder:
    """The process's `Encoder` for these settings: loaded on first use, inside the worker."""
    device = choose_device(device)
    model_threads, _ = split_threads(device, threads)
    loaded = Encoder(name, device, precision, model_threads)
    log.info("loaded %s on %s, precision %s, %d torch threads", name, device,
             loaded.precision or "auto (bf16 if the first batch agrees with fp32)", model_threads)
    return loaded
