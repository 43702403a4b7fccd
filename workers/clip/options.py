"""Options of the CLIP filter stage."""
from __future__ import annotations

from dataclasses import dataclass

from clipfleet.shared.options import option


@dataclass
class ClipOptions:
    filter_model: str = option("ViT-B-32/openai", "CLIP model for English pairs")
    multilingual_filter_model: str = option("xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k",
                                            "CLIP model for other-language and no-language pairs")
    min_similarity_en: float = option(0.28, "keep English pairs at or above this cosine")
    min_similarity_other: float = option(0.26, "keep other pairs at or above this cosine")
