"""What a search returns: filters that keep the count, near-duplicate removal as clip back does
it, aesthetic re-weighting from the run's own scores, memory-mapped metadata by global id."""
from __future__ import annotations

import base64

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.sandbox.web import decompression_bomb_png
from clipfleet.search.catalog import Catalog
from clipfleet.search.encoder import QueryError
from clipfleet.search.engine import Engine, Filters, keep_first_of_components
from clipfleet.search.settings import ServeSettings
from clipfleet.shared import layout
from clipfleet.shared.storage import Store

from tests.search.conftest import DUPLICATE_OF, SHARDS, build_store


def test_metadata_by_global_id(engine, search_store):
    _, known = search_store
    ids = list(known)[::7] + [layout.global_id(SHARDS[0], 10**5), layout.global_id(55, 0), -1]
    metas = engine.metadata(ids)
    for gid, meta in zip(ids, metas):
        if gid in known:
            assert meta["url"] == known[gid]["url"] and meta["caption"] == known[gid]["caption"]
            assert meta["width"] == known[gid]["width"]
        else:
            assert meta is None


def test_catalog_is_memory_mapped(engine):
    catalog: Catalog = engine.catalog
    assert len(catalog) == engine.ntotal
    # Every batch is a view of the mapped file, not a copy in the heap.
    buffer = catalog._batches[0].column("caption").buffers()[2]
    base = catalog._source.size()
    assert 0 < buffer.size < base and catalog.tag_columns[:3] == ["punsafe", "pwatermark", "aesthetic"]


def test_text_query_finds_its_class(engine, search_store):
    _, known = search_store
    wanted = {gid for gid, t in known.items() if (t["true_color"], t["true_shape"]) == ("green", "circle")}
    outcome = engine.search(engine.embed(text="a green circle"), len(wanted))
    assert len(set(outcome.ids.tolist()) & wanted) >= len(wanted) - 1


def test_safety_filter_keeps_the_count(engine, search_store):
    _, known = search_store
    query = engine.embed(text="a brown square")
    plain = engine.search(query, 40)
    safe = engine.search(query, 40, filters=Filters(max_punsafe=0.5))
    assert len(safe.ids) == 40, "searched deeper until 40 passed"
    punsafe = engine.catalog.column(safe.ids, "punsafe")
    assert (punsafe <= 0.5).all()
    assert sum(known[g]["unsafe"] for g in plain.ids.tolist()) > 0, "the unfiltered results had unsafe ones"
    assert sum(known[g]["unsafe"] for g in safe.ids.tolist()) <= 1, "the unsafe head catches the stand-ins"
    assert safe.depth > 40 and safe.complete


def test_filters_stop_at_the_index_size(engine, search_store):
    _, known = search_store
    everything = engine.search(engine.embed(text="a pink star"), 10_000, filters=Filters(max_pwatermark=0.5))
    assert everything.complete and everything.depth == engine.ntotal
    clean = int((engine.catalog.column(list(known), "pwatermark") <= 0.5).sum())
    assert 0 < len(everything.ids) == clean < len(known)


def test_depth_cap_says_so(search_store, tmp_path):
    store, _ = search_store
    capped = Engine(Store(store), ServeSettings(cache_dir=str(tmp_path), max_search_depth=20), load_model=False)
    query = capped.embed(embedding=[1.0] * capped.dim)
    outcome = capped.search(query, 10, filters=Filters(languages=("xx",)))
    assert len(outcome.ids) == 0 and not outcome.complete
    assert "max-search-depth" in outcome.notes["num_result_ids"]


def test_language_filter(engine, search_store):
    _, known = search_store
    outcome = engine.search(engine.embed(text="a green circle"), 10, filters=Filters(languages=("fr", "de")))
    assert len(outcome.ids) == 10
    assert {known[g]["language"] for g in outcome.ids.tolist()} <= {"fr", "de"}


def test_near_duplicates_removed_first_kept(engine, search_store):
    _, known = search_store
    copies = [g for g, t in known.items() if t["duplicate_of"] is not None]
    assert len(copies) == len(DUPLICATE_OF)
    original = known[copies[0]]["duplicate_of"]
    query = engine.catalog.embeddings([original])
    plain = engine.search(query, 5)
    assert {original, copies[0]} <= set(plain.ids[:2].tolist())
    deduped = engine.search(query, 5, filters=Filters(deduplicate=True))
    assert len(deduped.ids) == 5
    first = plain.ids[0]  # the pair ties; whichever ranks first stays
    assert deduped.ids[0] == first and len({original, copies[0]} & set(deduped.ids.tolist())) == 1


def test_connected_components_keep_the_first():
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.96, 0.28, 0.0])   # ~a (0.96)
    c = np.array([0.85, 0.53, 0.0])   # ~b (0.97) but not ~a (0.85): same component through b
    d = np.array([0.0, 0.0, 1.0])
    assert keep_first_of_components(np.stack([a, b, c, d])).tolist() == [0, 3]
    assert keep_first_of_components(np.stack([d, c, a])).tolist() == [0, 1, 2]


def test_aesthetic_reweighting_moves_towards_the_rating(engine, search_store):
    """The fixture rates red images 9: re-weighting towards 9 brings red ones up, as clip back's
    query + weight * mean(embeddings rated 9) does."""
    _, known = search_store
    query = engine.embed(text="a blue star")
    notes = {}
    moved = engine.reweight(query, 9, 1.0, notes)
    assert not notes and abs(np.linalg.norm(moved) - 1) < 1e-5
    red = lambda q: sum(known[g]["true_color"] == "red" for g in engine.search(q, 20).ids.tolist())  # noqa: E731
    before, after, further = red(query), red(moved), red(engine.reweight(query, 9, 3.0, {}))
    assert before < after < further and further >= 10
    nearest = {}
    engine.reweight(query, 5, 0.5, nearest)
    assert "nearest rating" in nearest["aesthetic_score"]


def test_min_aesthetic(engine, search_store):
    _, known = search_store
    outcome = engine.search(engine.embed(text="a purple triangle"), 5, filters=Filters(min_aesthetic=8))
    assert len(outcome.ids) == 5 and all(known[g]["true_color"] == "red" for g in outcome.ids.tolist())


def test_queries_that_cannot_be_answered(engine):
    with pytest.raises(QueryError, match="128"):
        engine.embed(embedding=[0.5] * 3)
    with pytest.raises(QueryError, match="finite"):
        engine.embed(embedding=[float("nan")] * engine.dim)
    with pytest.raises(QueryError, match="one of"):
        engine.embed()
    with pytest.raises(QueryError, match="too many pixels"):
        engine.embed(image=base64.b64encode(decompression_bomb_png(20000)).decode())


def test_no_text_index_is_a_clear_error(tmp_path, world, truth):
    store = str(tmp_path / "run")
    build_store(store, world, truth, with_text_index=False)
    engine = Engine(Store(store), ServeSettings(cache_dir=str(tmp_path / "cache")), load_model=False)
    with pytest.raises(QueryError, match="no text index"):
        engine.search(engine.embed(embedding=[1.0] * engine.dim), 3, modality="text")


def test_s3_store_and_rebuild_on_new_shards(s3_server, tmp_path, world, truth):
    from tests.conftest import make_bucket
    uri = f"s3://{make_bucket(s3_server)}/run"
    known = build_store(uri, world, truth)
    cache = tmp_path / "cache"
    engine = Engine(Store(uri), ServeSettings(cache_dir=str(cache)), load_model=False)
    some = list(known)[5]
    assert engine.metadata([some])[0]["url"] == known[some]["url"]
    query = engine.catalog.embeddings([some])
    assert engine.search(query, 1, filters=Filters(deduplicate=True)).ids[0] == some
    stamp = (cache / "manifest.json").stat().st_mtime_ns
    Engine(Store(uri), ServeSettings(cache_dir=str(cache)), load_model=False)
    assert (cache / "manifest.json").stat().st_mtime_ns == stamp, "same files: not rebuilt"
    # A shard's tags rewritten: the catalog notices (size and time changed) and rebuilds.
    table = pq.read_table(Store(uri).open(layout.tag_shard(SHARDS[0])))
    table = table.set_column(3, "aesthetic", pa.array([1.0] * table.num_rows, pa.float32()))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    Store(uri).write_bytes(layout.tag_shard(SHARDS[0]), sink.getvalue().to_pybytes())
    rebuilt = Engine(Store(uri), ServeSettings(cache_dir=str(cache)), load_model=False)
    assert rebuilt.catalog.take([layout.global_id(SHARDS[0], 0)], ["aesthetic"]).column(0)[0].as_py() == 1.0


def test_deadline_stops_the_deeper_search_and_says_so(engine):
    import time
    query = engine.embed(embedding=[1.0] * engine.dim)
    outcome = engine.search(query, 10, filters=Filters(languages=("xx",)), deadline=time.monotonic() - 1)
    assert outcome.rounds == 1 and not outcome.complete
    assert "query deadline" in outcome.notes["num_result_ids"]


def test_deduplicate_keeps_one_of_each_of_the_runs_near_duplicate_groups(search_store, tmp_path):
    import shutil
    directory = tmp_path / "run"
    shutil.copytree(search_store[0], directory)
    store = Store(str(directory))
    settings = ServeSettings(cache_dir=str(tmp_path / "cache"))
    engine = Engine(store, settings, load_model=False)
    query = engine.catalog.embeddings([next(iter(search_store[1]))])
    before = engine.search(query, 6, filters=Filters(deduplicate=True)).ids.tolist()
    # index-dedup grouped the 2nd and 4th results (pictures the embeddings alone do not join)
    groups = pa.table({"id": [before[1], before[3]], "key": ["b", "d"], "group": [before[1]] * 2,
                       "duplicate_of": [None, "b"]})
    buf = pa.BufferOutputStream()
    pq.write_table(groups, buf)
    store.write_bytes(layout.DEDUP_GROUPS, buf.getvalue().to_pybytes())
    store.write_json(layout.DEDUP_INFO, {"key": "g00001"})
    after = Engine(store, settings, load_model=False).search(query, 6, filters=Filters(deduplicate=True)).ids.tolist()
    assert before[1] in after and before[3] not in after and len(after) == 6
