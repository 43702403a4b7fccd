"""The request bodies of the search API, as clip-retrieval's ClipClient and clip front send them.

ClipClient sends every field, nulls included; clip front sends aesthetic_score and
aesthetic_weight as strings ("" for none) and its booleans as booleans. A null takes the
field's default (clip back's defaults: filters off). Fields past clip back's are clipfleet's
own filters; clip clients never send them.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TEXT = 10_000
MAX_URL = 4096
MAX_EMBEDDING = 4096
# A global id: shard << 20 | row, a 64-bit integer (numpy and faiss take no more).
SampleId = Annotated[int, Field(ge=0, le=2**63 - 1)]



def _digits(text: str) -> int:
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def _number_or_blank(value, parse, message: str):
    """clip front sends numbers as strings and '' for "none": None, the number, or `message`."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return parse(value.strip())
        except ValueError:
            raise ValueError(message) from None
    return value

class KnnQuery(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    text: str | None = Field(None, max_length=MAX_TEXT, description="a text query (first of the four inputs given)")
    image: str | None = Field(None, description="an image query: base64 bytes (JPEG, PNG, WebP, ...), or a data: URL")
    image_url: str | None = Field(None, max_length=MAX_URL, description="an image query by http(s) URL, fetched by the service")
    embedding_input: list[float] | None = Field(None, max_length=MAX_EMBEDDING,
                                                description="a raw query embedding of the index's dimension")
    similar_to: SampleId | None = Field(None, description="search with the stored image embedding of this result id "
                                                            "(what clicking a result in the web UI does)")
    modality: Literal["image", "text"] | None = Field("image", description="search the image or the text index")
    num_images: int | None = Field(40, ge=1, description="results returned with their metadata")
    num_result_ids: int | None = Field(None, ge=1, description="results returned in all (the rest as id and "
                                                               "similarity only); default num_images")
    indice_name: str | None = Field(None, max_length=1000, description="an index from /indices-list; default the first")
    use_mclip: bool | None = Field(False, description="accepted; queries are embedded with the run's own model")
    deduplicate: bool | None = Field(False, description="drop near-duplicate images (the run's near-duplicate groups, then cosine >= 0.94; first kept)")
    use_safety_model: bool | None = Field(False, description="drop samples with punsafe > 0.5")
    use_violence_detector: bool | None = Field(False, description="accepted; reported when the run has no such model")
    aesthetic_score: int | str | None = Field(None, description="move the query towards samples rated this "
                                                                "(0-9); '' for none")
    aesthetic_weight: float | str | None = Field(None, description="how far (default 0.5); '' for the default")
    # clipfleet's own filters
    language: list[str] | str | None = Field(None, description="keep only these languages ('' is no language)")
    max_punsafe: float | None = Field(None, ge=0, le=1, description="drop samples with punsafe above this")
    max_pwatermark: float | None = Field(None, ge=0, le=1, description="drop samples with pwatermark above this")
    min_aesthetic: float | None = Field(None, description="drop samples whose aesthetic score is under this")

    @field_validator("aesthetic_score")
    @classmethod
    def _score(cls, value):
        value = _number_or_blank(value, _digits, "aesthetic_score must be an integer from 0 to 9, or ''")
        if value is not None and not 0 <= value <= 9:
            raise ValueError("aesthetic_score must be from 0 to 9")
        return value

    @field_validator("aesthetic_weight")
    @classmethod
    def _weight(cls, value):
        value = _number_or_blank(value, float, "aesthetic_weight must be a number, or ''")
        if value is not None and (not math.isfinite(value) or abs(value) > 100):
            raise ValueError("aesthetic_weight must be a finite number from -100 to 100")
        return value

    @field_validator("language")
    @classmethod
    def _language(cls, value):
        if value is None:
            return None
        values = [value] if isinstance(value, str) else value
        if len(values) > 200 or any(len(v) > 35 for v in values):
            raise ValueError("language: at most 200 codes of at most 35 characters")
        return values


class MetadataQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[SampleId] = Field(..., description="global sample ids from /knn-service")
    indice_name: str | None = Field(None, max_length=1000, description="an index from /indices-list; default the first")


class ExportQuery(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    ids: list[SampleId] = Field(..., description="global sample ids, in the order to export")
    similarities: list[float] | None = Field(None, description="each id's similarity to the query, kept as a column")
    indice_name: str | None = Field(None, max_length=1000)
