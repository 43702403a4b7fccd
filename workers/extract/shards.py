"""The URL shard writer: kept pairs in, `urls/{shard}.parquet` files of `shard_size` rows out,
each row tagged with its caption's language (layout.URL_SHARD_SCHEMA)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.ids import pair_uids
from clipfleet.shared.language import LanguageTagger, language_bucket
from clipfleet.shared.storage import shard_name

# A URL shard id is segment * PARTS_PER_SEGMENT + part, so ids follow from the input.
PARTS_PER_SEGMENT = 1000


class UrlShardWriter:
    """Collects kept pairs and writes them as parquet shards of `size` rows, in order."""

    def __init__(self, out: Path, segment: int, size: int, tagger: LanguageTagger, stats: Counter):
        self.out, self.segment, self.size = out, segment, size
        self.tagger, self.stats = tagger, stats
        self.pending: list[tuple[str, str, str]] = []  # (url, caption, page_url) not yet in a shard
        self.files: dict[str, Path] = {}
        self.shards: list[int] = []

    def extend(self, pairs: list[tuple[str, str, str]]) -> None:
        """Pairs (url, caption, page_url) in order; a shard is written each time `size` are in."""
        self.pending += pairs
        while len(self.pending) >= self.size:
            self._write(self.pending[:self.size])
            del self.pending[:self.size]

    def flush(self) -> None:
        if self.pending:
            self._write(self.pending)
        self.pending = []

    def _write(self, pairs: list[tuple[str, str, str]]) -> None:
        part = len(self.shards)
        if part >= PARTS_PER_SEGMENT:
            raise ValueError(f"segment {self.segment} yields more than {PARTS_PER_SEGMENT} URL shards; "
                             f"use a larger --shard-size")
        shard = self.segment * PARTS_PER_SEGMENT + part
        urls, captions, pages = (pa.array(column, pa.string()) for column in zip(*pairs))
        # language ID once per distinct caption of the shard, spread back to its rows
        distinct = pc.dictionary_encode(captions)
        tags = self.tagger.tag_many(distinct.dictionary.to_pylist())
        languages = pa.array([code for code, _ in tags], pa.string()).take(distinct.indices)
        for count in pc.value_counts(languages).to_pylist():
            self.stats[f"lang_{language_bucket(count['values'])}"] += count["counts"]
        table = pa.table({
            "url": urls, "caption": captions, "page_url": pages, "language": languages,
            "language_score": pa.array([score for _, score in tags], pa.float32()).take(distinct.indices),
            "uid": pair_uids(urls, captions)}, schema=layout.URL_SHARD_SCHEMA)
        path = self.out / f"{shard_name(shard)}.parquet"
        # URLs and uids are all distinct: a dictionary for them is built only to be dropped
        pq.write_table(table, path, compression="zstd", use_dictionary=["caption", "page_url", "language"])
        self.files[layout.url_shard(shard)] = path
        self.shards.append(shard)
