"""Options of the CLIP filter stage."""
from __future__ import annotations

from dataclasses import dataclass

from clipfleet.shared.models import suggested_min_similarity
from clipfleet.shared.models.runtime import DEVICES, PRECISIONS
from clipfleet.shared.options import not_negative, option, positive

# LAION-5B's thresholds, for the models it used (OpenAI ViT-B/32; multilingual CLIP).
LAION_MIN_SIMILARITY = {"en": 0.28, "other": 0.26}


def _cosine(value) -> str | None:
    return None if value is None or -1.0 <= value <= 1.0 else "must be a cosine, between -1 and 1"


@dataclass
class ClipOptions:
    filter_model: str = option("ViT-B-32/openai", "CLIP model for English pairs")
    multilingual_filter_model: str = option("xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k",
                                            "CLIP model for other-language and no-language pairs")
    min_similarity_en: float | None = option(
        None, "keep English pairs at or above this cosine (default: the threshold the model ships "
              "calibrated for, else LAION's 0.28)", check=_cosine)
    min_similarity_other: float | None = option(
        None, "keep other pairs at or above this cosine (default: the threshold the model ships "
              "calibrated for, else LAION's 0.26)", check=_cosine)
    keep_top_percent: float | None = option(
        None, "then publish only the top P%% by similarity of each bucket's judged samples, across the whole "
              "run (DataComp's filter), once the run has settled; the thresholds still decide what is embedded, "
              "so a P beyond that is refused. `clipfleet refilter` changes it later", metavar="P",
        check=lambda p: None if p is None or 0 < p <= 100 else "must be in (0, 100]")
    clip_batch_size: int = option(256, "samples per forward pass of the filter models", check=positive)
    clip_device: str = option("auto", "where the filter models run (auto: cuda when present)", choices=DEVICES)
    clip_precision: str = option("auto", "auto: fp16 on cuda; on CPU bf16 where it has native bf16 and the first "
                                         "batch's similarities stay within 0.01 of fp32, else fp32",
                                 choices=PRECISIONS)
    clip_threads: int = option(0, "torch threads on CPU (0: every core, and a decode thread per 8 cores "
                               "beside them; N: N threads, and the other cores decode)",
                               check=not_negative)

    def __post_init__(self):
        # Resolved when the config is made, so run.json shows the thresholds in force.
        if self.min_similarity_en is None:
            self.min_similarity_en = default_min_similarity(self.filter_model, "en")
        if self.min_similarity_other is None:
            self.min_similarity_other = default_min_similarity(self.multilingual_filter_model, "other")


def default_min_similarity(model: str, bucket: str) -> float:
    """The model's calibrated threshold (metrics.json), else LAION's for the bucket."""
    suggested = suggested_min_similarity(model)
    return LAION_MIN_SIMILARITY[bucket] if suggested is None else suggested
