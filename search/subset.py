"""Subset export: search results as a parquet file that img2dataset downloads as it is
(`img2dataset --url_list FILE --input_format parquet --url_col url --caption_col caption`).

Columns: url, caption, similarity (to the query), then the sample's own metadata and tags
(key, language, width, height, clip_similarity, punsafe, pwatermark, aesthetic, ...) and id.
`clipfleet subset` runs the search in this process, with no server.
"""
from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FIRST = ("url", "caption", "similarity")


def subset_table(engine, ids, similarities=None) -> pa.Table:
    """The export table of `ids` (in their order); ids the run does not have are left out."""
    ids = np.asarray(ids, np.int64)
    table = engine.catalog.take(ids)
    found = np.asarray(table.column("url").is_valid()) & ~np.isin(ids, engine.taken_down())
    sims = np.full(len(ids), np.nan, np.float32) if similarities is None else np.asarray(similarities, np.float32)
    table = table.append_column("similarity", pa.array(sims, pa.float32())) \
                 .append_column("id", pa.array(ids, pa.int64())).filter(pa.array(found))
    rest = [n for n in table.column_names if n not in FIRST]
    return table.select(list(FIRST) + rest)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def run_subset(store_uri: str, query: str, k: int, out: str, *, max_punsafe=None, max_pwatermark=None,
               min_aesthetic=None, deduplicate: bool = False, languages=None, modality: str = "image",
               cache_dir: str | None = None) -> dict:
    """Search `query` for `k` samples passing the filters and write them to `out`."""
    from clipfleet.search.engine import Engine, Filters
    from clipfleet.search.settings import ServeSettings
    from clipfleet.shared.storage import Store

    if k < 1:
        raise ValueError("--k must be at least 1")
    from clipfleet.search.catalog import CatalogError
    from clipfleet.search.index import IndexMissing
    from clipfleet.shared.models import ModelNotAvailable
    settings = ServeSettings(cache_dir=cache_dir, max_search_depth=max(k * 100, 100_000))
    try:
        engine = Engine(Store(store_uri), settings)
    except (CatalogError, IndexMissing, ModelNotAvailable) as exc:
        raise ValueError(f"cannot search {store_uri}: {exc}") from None  # the CLI's one-line error
    started = time.monotonic()
    vector = engine.embed(text=query)
    filters = Filters(deduplicate=deduplicate, max_punsafe=max_punsafe, max_pwatermark=max_pwatermark,
                      min_aesthetic=min_aesthetic, languages=tuple(languages) if languages else None)
    outcome = engine.search(vector, k, modality=modality, filters=filters)
    table = subset_table(engine, outcome.ids, outcome.sims)
    with open(out, "wb") as f:
        f.write(parquet_bytes(table))
    return {"rows": table.num_rows, "asked": k, "searched": outcome.depth, "notes": outcome.notes,
            "seconds": time.monotonic() - started}
