"""Options of the embedding stage."""
from __future__ import annotations

from dataclasses import dataclass

from clipfleet.shared.models.runtime import DEVICES, PRECISIONS
from clipfleet.shared.options import not_negative, option, positive


@dataclass
class EmbedOptions:
    embed_model: str = option("ViT-L-14/openai", "model for the image and text embeddings")
    embed_batch_size: int = option(256, "samples per forward pass of the embedding model", check=positive)
    embed_device: str = option("auto", "where the embedding model runs (auto: cuda when present)",
                               choices=DEVICES)
    embed_precision: str = option("auto", "auto: fp16 on cuda; on CPU bf16 where it has native bf16 and the first "
                                          "batch's similarities stay within 0.01 of fp32, else fp32",
                                  choices=PRECISIONS)
    embed_threads: int = option(0, "torch threads on CPU (0: every core, and a decode thread per 8 cores "
                                "beside them; N: N threads, and the other cores decode)",
                                check=not_negative)
