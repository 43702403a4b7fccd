"""Options of the embedding stage."""
from __future__ import annotations

from dataclasses import dataclass

from clipfleet.shared.options import option


@dataclass
class EmbedOptions:
    embed_model: str = option("ViT-L-14/openai", "model for the image and text embeddings")
