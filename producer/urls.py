"""`clipfleet run --urls`: turn the user's parquet files into the URL shards the download stage reads.

Any parquet with a URL and a caption column will do (names set by --url-col / --caption-col).
Shards get the same columns and ids as the extract stage writes (input index * 1000 + part),
so a `--urls` run continues exactly like a crawl from the download stage on. Writing is
idempotent: a shard already in the store is left as it is, since the same inputs and shard
size (checked through run.json) give the same shards.
"""
from __future__ import annotations

import io

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.shared.layout import URL_SHARD_SCHEMA, url_shard
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store, s3_options_from_env, shard_name

PARTS_PER_INPUT = 1000  # the extract stage's PARTS_PER_SEGMENT: shard id = input * 1000 + part

class UrlInputError(ValueError):
    """An input parquet cannot be used as a URL list."""


def open_input(uri: str):
    options = s3_options_from_env() if uri.startswith("s3://") else {}
    return fsspec.open(uri, "rb", **options)


def input_columns(uri: str, url_col: str, caption_col: str) -> list[str]:
    """The columns to read; a missing file, URL or caption column is a clear error."""
    try:
        with open_input(uri) as f:
            names = pq.ParquetFile(f).schema_arrow.names
    except (OSError, pa.ArrowInvalid) as exc:
        raise UrlInputError(f"{uri} cannot be read as parquet: {exc}") from exc
    for option, column in (("--url-col", url_col), ("--caption-col", caption_col)):
        if column not in names:
            raise UrlInputError(f"{uri} has no column {column!r} (columns: {', '.join(names)}); "
                                f"name the right one with {option}")
    optional = [c for c in ("page_url", "language", "language_score", "uid") if c in names]
    return [url_col, caption_col] + [c for c in optional if c not in (url_col, caption_col)]


def standard_table(batch: pa.Table, cfg: RunConfig, tagger=None) -> pa.Table:
    """The extract stage's columns: url, caption, page_url, language, language_score, uid."""
    from clipfleet.shared.ids import pair_uid
    urls = batch.column(cfg.input.url_col).cast(pa.string()).to_pylist()
    captions = batch.column(cfg.input.caption_col).cast(pa.string()).to_pylist()
    n = len(urls)
    columns = batch.column_names

    def given(name: str, default):
        return batch.column(name).to_pylist() if name in columns else [default] * n

    page_urls = given("page_url", None)
    if "language" in columns:
        languages, scores = given("language", None), given("language_score", None)
    else:  # tag the captions the way the extract stage does, so later stages pick the same model
        tags = [tagger.tag(c or "") for c in captions]
        languages, scores = [t[0] for t in tags], [t[1] for t in tags]
    uids = given("uid", None)
    uids = [u if u else pair_uid(url or "", cap or "") for u, url, cap in zip(uids, urls, captions)]
    return pa.table({"url": urls, "caption": captions, "page_url": page_urls, "language": languages,
                     "language_score": scores, "uid": uids}, schema=URL_SHARD_SCHEMA)


def iter_parts(uri: str, columns: list[str], size: int):
    """Tables of exactly `size` rows (the last may be shorter), streamed from one parquet file."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    with open_input(uri) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=size, columns=columns):
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= size:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, size)
                rest = table.slice(size)
                pending, pending_rows = rest.to_batches(), rest.num_rows
    if pending_rows:
        yield pa.Table.from_batches(pending)


def write_url_shards(store: Store, cfg: RunConfig) -> list[int]:
    """Write urls/NNNNN.parquet for every input; returns the shard ids in order."""
    from clipfleet.shared.language import LanguageTagger
    tagger = LanguageTagger(cfg.extract.min_language_score)
    existing = set(store.list("urls"))
    shards = []
    for index, uri in enumerate(cfg.inputs):
        columns = input_columns(uri, cfg.input.url_col, cfg.input.caption_col)
        for part, batch in enumerate(iter_parts(uri, columns, cfg.input.shard_size)):
            if part >= PARTS_PER_INPUT:
                raise UrlInputError(f"{uri} makes more than {PARTS_PER_INPUT} shards of {cfg.input.shard_size} rows; "
                                    f"use a larger --shard-size or split the file")
            shard = index * PARTS_PER_INPUT + part
            name = f"{shard_name(shard)}.parquet"
            if name not in existing:
                buf = io.BytesIO()
                pq.write_table(standard_table(batch, cfg, tagger), buf, compression="zstd")
                store.write_bytes(url_shard(shard), buf.getvalue())
            shards.append(shard)
    return shards
