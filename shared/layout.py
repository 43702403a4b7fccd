"""Where every stage's outputs live in a store, and the schemas of the tables among them.

One place for these, so a stage reads its inputs from the paths the stage before wrote, and a
reader (status, report, search, takedown) finds them without knowing which stage wrote what.
See ../shared/DESIGN.md "Storage layout".
"""
from __future__ import annotations

import pyarrow as pa

from clipfleet.shared.storage import shard_name

RUN_FILE = "run.json"

URL_SHARD_SCHEMA = pa.schema([
    ("url", pa.string()), ("caption", pa.string()), ("page_url", pa.string()),
    ("language", pa.string()), ("language_score", pa.float32()), ("uid", pa.string())])

CLIP_SCHEMA = pa.schema([
    ("key", pa.string()), ("similarity", pa.float32()), ("kept", pa.bool_()), ("model", pa.string())])

EMBEDDING_METADATA_COLUMNS = ("key", "url", "caption", "similarity", "language", "width", "height")

# The published dataset's parquet: LAION's column names, plus our key.
DATASET_COLUMNS = ("key", "URL", "TEXT", "WIDTH", "HEIGHT", "LANGUAGE", "similarity",
                   "punsafe", "pwatermark", "aesthetic", "hash")


def url_shard(shard) -> str:
    return f"urls/{shard_name(shard)}.parquet"


def image_shard(shard, ext: str = "tar") -> str:
    """images/NNNNN.tar | .parquet | _stats.json (ext "stats"), img2dataset's layout."""
    name = shard_name(shard)
    return f"images/{name}_stats.json" if ext == "stats" else f"images/{name}.{ext}"


def clip_shard(shard) -> str:
    return f"clip/{shard_name(shard)}.parquet"


def clip_embeddings(shard) -> str:
    """The filter's embeddings of kept samples when its model is also the embed model, so the
    embed stage decodes and encodes nothing twice (npz: keys, img, text, float16)."""
    return f"clip/{shard_name(shard)}_emb.npz"


EMBEDDINGS = "embeddings"


def image_embeddings(shard) -> str:
    return f"{EMBEDDINGS}/img_emb/img_emb_{shard_name(shard)}.npy"


def text_embeddings(shard) -> str:
    return f"{EMBEDDINGS}/text_emb/text_emb_{shard_name(shard)}.npy"


def embedding_metadata(shard) -> str:
    return f"{EMBEDDINGS}/metadata/metadata_{shard_name(shard)}.parquet"


def tag_shard(shard) -> str:
    return f"tags/{shard_name(shard)}.parquet"


def dataset_shard(shard, ext: str = "tar") -> str:
    return f"dataset/{shard_name(shard)}.{ext}"


INDEX = "index"
TAKEDOWNS = "takedowns"

# A sample's global id (index, search, takedown): its shard and its row in that shard's embeddings,
# packed so ids map to metadata without any table in memory. 2**20 rows per shard is far above
# any shard size a run uses (default 10 000).
ROW_BITS = 20


def global_id(shard: int, row: int) -> int:
    return (int(shard) << ROW_BITS) | int(row)


def split_id(gid: int) -> tuple[int, int]:
    return int(gid) >> ROW_BITS, int(gid) & ((1 << ROW_BITS) - 1)
