"""Where every stage's outputs live in a store, and the schemas of the tables among them.

One place for these, so a stage reads its inputs from the paths the stage before wrote, and a
reader (status, report, search, takedown) finds them without knowing which stage wrote what.
See ../shared/DESIGN.md "Storage layout".
"""
from __future__ import annotations

import pyarrow as pa

from clipfleet.shared.storage import shard_name

RUN_FILE = "run.json"
DATASET_CARD = "README.md"  # the Hugging Face dataset card of what is published (workers/publish/card.py)

URL_SHARD_SCHEMA = pa.schema([
    ("url", pa.string()), ("caption", pa.string()), ("page_url", pa.string()),
    ("language", pa.string()), ("language_score", pa.float32()), ("uid", pa.string())])

CLIP_SCHEMA = pa.schema([
    ("key", pa.string()), ("similarity", pa.float32()), ("kept", pa.bool_()), ("model", pa.string())])

# images/{shard}.parquet: img2dataset's columns (workers/download/writer.py), then ours: the picture's
# perceptual hash (16 hex digits, null without a picture) and whether it matched --decontaminate's
# set (null when the run has none).
IMAGE_EXTRA_FIELDS = [("phash", pa.string()), ("contaminated", pa.bool_())]

EMBEDDING_METADATA_COLUMNS = ("key", "url", "caption", "similarity", "language", "width", "height")

# The published dataset's parquet: LAION's column names, plus our key, download's marks and
# `duplicate_of` (the key of the sample kept for its near-duplicate group; null until the index
# stage's dedup task sets it, and for a sample in no group or the one kept).
DATASET_COLUMNS = ("key", "URL", "TEXT", "WIDTH", "HEIGHT", "LANGUAGE", "similarity",
                   "punsafe", "pwatermark", "aesthetic", "hash", "phash", "contaminated", "duplicate_of")


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
INDEX_MODALITIES = ("image", "text")


def index_root(modality: str = "image") -> str:
    """index/ for the image index (what search serves), index/text/ for the optional text index."""
    if modality not in INDEX_MODALITIES:
        raise ValueError(f"no {modality!r} index; modalities are {', '.join(INDEX_MODALITIES)}")
    return INDEX if modality == "image" else f"{INDEX}/text"


def trained_index(modality: str = "image") -> str:
    return f"{index_root(modality)}/trained.index"


def index_part(shard, modality: str = "image") -> str:
    return f"{index_root(modality)}/parts/{shard_name(shard)}.index"


def serving_dir(generation: int, modality: str = "image") -> str:
    """One merged serving index per generation; infos.json names the current one."""
    return f"{index_root(modality)}/serving/{generation:05d}"


def index_infos(modality: str = "image") -> str:
    return f"{index_root(modality)}/infos.json"


TAKEDOWN_IDS = f"{TAKEDOWNS}/ids.npy"              # sorted int64 global ids never served again
TAKEDOWN_BLOCKLIST = f"{TAKEDOWNS}/blocklist.txt"  # download's --blocklist format


# `clipfleet refilter` (workers/publish/refilter.py): the global ids a percentile filter left out of dataset/
# (embedded, not published), and the filter in force, written last.
FILTERED_IDS = "filtered/ids.npy"
FILTER_RECORD = "filtered/filter.json"
FILTER_TARGETS = "filtered/targets.npy"  # the target vectors `refilter --keep-near` voted with


# index-dedup (workers/index/dedup.py): the run's near-duplicate groups, and their record (written last)
DEDUP_GROUPS = "dedup/groups.parquet"
DEDUP_INFO = "dedup/info.json"


def takedown_record(stamp: str) -> str:
    return f"{TAKEDOWNS}/{stamp}.json"

# A sample's global id (index, search, takedown): its shard and its row in that shard's embeddings,
# packed so ids map to metadata without any table in memory. 2**20 rows per shard is far above
# any shard size a run uses (default 10 000).
ROW_BITS = 20


def global_id(shard: int, row: int) -> int:
    return (int(shard) << ROW_BITS) | int(row)


def split_id(gid: int) -> tuple[int, int]:
    return int(gid) >> ROW_BITS, int(gid) & ((1 << ROW_BITS) - 1)


# -- completion markers: _markers/{stage}/{shard}.json, written by shared/pipeline.execute ---------
# Every reader (run state, status, report, counts) reads these fields, never a stage's own stat names.
MARKER_FIELDS = {
    "stage": "the stage (or run-once task) that wrote it",
    "shard": "the shard id (or run-once key)",
    "outputs": "store-relative files it published",
    "samples_in": "samples the shard brought into the stage (null: the stage does not count samples)",
    "samples_out": "samples it kept and handed on (null: as above)",
    "dropped": "names of the `stats` entries that count dropped samples (a group's name: all its reasons)",
    "stats": "every count and value the stage recorded; nested dicts are groups of counts",
    "started_at": "epoch seconds", "finished_at": "epoch seconds", "duration_s": "seconds of work",
    "next_shards": "the next stage's shards this one made (usually [shard])",
    "host": "the machine that ran it",
}


def stage_summary(stage: str) -> str:
    """What the run state has read of a stage's markers (shared/summaries.py); markers stay the truth."""
    return f"_state/{stage}.json"


# Written when a look at the store found every stage complete: the summaries then hold every marker
# and a later look reads them without listing. Whatever adds shards to a run (run, retry-failed)
# removes it first.
SEALED = "_state/sealed.json"
