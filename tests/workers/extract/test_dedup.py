"""Fleet-wide dedup through a real Redis: first claim wins, and a segment run again keeps its own."""
from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis

from clipfleet.shared.pipeline import TransientError
from clipfleet.shared.runconfig import RunConfig
from clipfleet.workers.extract import stage as extract
from clipfleet.workers.extract.dedup import MAX_OWNER, SUB_BITS, RunDedup, bucket_bits, dedup_namespace, url_digest
from clipfleet.workers.extract.rules import extract_pairs
from clipfleet.workers.extract.stage import ExtractStage
from clipfleet.workers.extract.wat import open_wat
from tests.helpers import run_direct
from tests.workers.extract.watfile import good_page, img, response_record, write_wat

CFG = RunConfig.make(store="unused").extract


def digests(*urls: str) -> list[bytes]:
    return [url_digest(u) for u in urls]


def test_digests_are_stable_and_compact():
    assert url_digest("http://example.org/a.jpg") == url_digest("http://example.org/a.jpg")
    assert url_digest("http://example.org/a.jpg") != url_digest("http://example.org/b.jpg")
    assert len(url_digest("http://example.org/a.jpg")) == 8


def test_first_claim_wins_and_owner_keeps_its_claims(redis_url):
    dedup = RunDedup(redis.Redis.from_url(redis_url), "cf:dedup:test", bits=8)
    assert dedup.claim(digests("a", "b"), owner=0) == [True, True]
    assert dedup.claim(digests("b", "c"), owner=1) == [False, True]
    # segment 0 again (a redelivered task): it still holds a and b, c stays with segment 1
    assert dedup.claim(digests("a", "b", "c"), owner=0) == [True, True, False]
    assert dedup.claim([], owner=2) == []


def test_namespaces_keep_runs_apart(redis_url):
    client = redis.Redis.from_url(redis_url)
    one = RunDedup(client, dedup_namespace(RunConfig.make(store="/a", created_at=1.0)), bits=8)
    two = RunDedup(client, dedup_namespace(RunConfig.make(store="/a", created_at=2.0)), bits=8)
    assert one.claim(digests("x"), owner=0) == [True]
    assert two.claim(digests("x"), owner=5) == [True]


def test_bucket_count_grows_with_the_run():
    assert bucket_bits(1) < bucket_bits(1000) < bucket_bits(100_000) <= 32
    assert bucket_bits(0) >= 8


def _segment_files(tmp_path: Path) -> list[str]:
    """Three WATs: 0 and 1 share ten image URLs (with other alts), 2 repeats a URL of 1 twice."""
    shared = [img(f"http://example.org/shared/{i}.jpg", f"shared picture {i}") for i in range(10)]
    own = lambda s: [img(f"http://example.org/{s}/{i}.jpg", f"own picture {s} {i}") for i in range(30)]
    files = []
    for seg, links in enumerate([shared + own(0), own(1) + [dict(l, alt="another alt") for l in shared],
                                 own(2) + [img("http://example.org/1/3.jpg", "late copy")] * 2]):
        path = tmp_path / f"seg{seg}.wat.gz"
        write_wat(path, [response_record(f"http://example.org/page{seg}.html", links)])
        files.append(str(path))
    return files


def _run(stage: ExtractStage, segment: int, wat: str, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    result, counts = run_direct(stage, None, segment, out, wat=wat)
    rows = [r for f in result.files.values() for r in pq.read_table(f).to_pylist()]
    return result, counts, rows


def test_segments_in_order_and_a_redelivered_segment(redis_url, tmp_path):
    wats = _segment_files(tmp_path)
    cfg = RunConfig.make(store=str(tmp_path / "store"), inputs=wats, shard_size=25)
    stage = ExtractStage(cfg, redis_client=redis.Redis.from_url(redis_url))
    first, _, rows0 = _run(stage, 0, wats[0], tmp_path / "o0")
    assert first.next_shards == [0, 1] and len(rows0) == 40  # 25 + 15 rows, ids 0 and 1
    second, second_counts, rows1 = _run(stage, 1, wats[1], tmp_path / "o1")
    assert len(rows1) == 30 and second_counts["drop_duplicate_in_run"] == 10
    assert second.next_shards == [1000, 1001]
    _, third, rows2 = _run(stage, 2, wats[2], tmp_path / "o2")
    assert len(rows2) == 30
    assert third["drop_duplicate_in_run"] == 1 and third["drop_duplicate_in_segment"] == 1
    # segment 1 delivered again after its claims were made: the same rows, nothing lost
    again, _, rows1_again = _run(stage, 1, wats[1], tmp_path / "o1-again")
    assert rows1_again == rows1 and again.next_shards == second.next_shards
    urls = [r["url"] for r in rows0 + rows1 + rows2]
    assert len(urls) == len(set(urls)) == 100
    assert {r["caption"] for r in rows0 if "/shared/" in r["url"]} == {f"shared picture {i}" for i in range(10)}


def test_concurrent_segments_keep_each_url_once(redis_url, tmp_path):
    wats = _segment_files(tmp_path)
    cfg = RunConfig.make(store=str(tmp_path / "store"), inputs=wats)
    results = {}

    def work(segment):
        stage = ExtractStage(cfg, redis_client=redis.Redis.from_url(redis_url))
        results[segment] = _run(stage, segment, wats[segment], tmp_path / f"c{segment}")[2]

    threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    urls = Counter(r["url"] for rows in results.values() for r in rows)
    assert len(urls) == 100 and set(urls.values()) == {1}


def test_dedup_by_uid_keeps_a_url_with_another_caption(redis_url, tmp_path):
    wats = _segment_files(tmp_path)
    cfg = RunConfig.make(store=str(tmp_path / "store"), inputs=wats, dedup_by="uid")
    stage = ExtractStage(cfg, redis_client=redis.Redis.from_url(redis_url))
    rows = [r for s in range(3) for r in _run(stage, s, wats[s], tmp_path / f"u{s}")[2]]
    assert len(rows) == 111  # the shared URLs twice (two alts), "late copy" once
    assert len({r["uid"] for r in rows}) == 111


def test_claims_land_in_the_bucket_python_computes(redis_url):
    client = redis.Redis.from_url(redis_url)
    dedup = RunDedup(client, "cf:dedup:buckets", bits=12)
    urls = [f"http://example.org/{i}.jpg" for i in range(500)]
    dedup.claim(digests(*urls), owner=7)
    keys = {k.decode() for k in client.scan_iter("cf:dedup:buckets:*")}
    assert {dedup.bucket_key(d) for d in digests(*urls)} == keys and len(keys) > 100
    assert [dedup.owner_of(d) for d in digests(*urls)] == [7] * 500
    assert dedup.owner_of(url_digest("http://example.org/never.jpg")) is None
    # compact: every bucket stays a packed hash, every page under Redis's 64-byte value limit
    assert {client.object("encoding", k) for k in keys} <= {b"ziplist", b"listpack"}
    assert max(len(v) for k in keys for v in client.hvals(k)) <= 63


def _digest(bucket: int, sub: int, suffix: int, bits: int = 8) -> bytes:
    """A digest with chosen bucket, page family and stored suffix (layout in dedup.py)."""
    value = (bucket << (64 - bits)) | (sub << (64 - bits - SUB_BITS)) | (suffix << (64 - bits - SUB_BITS - 32))
    return value.to_bytes(8, "big")


def test_a_full_page_continues_and_matches_are_whole_records(redis_url):
    client = redis.Redis.from_url(redis_url)
    dedup = RunDedup(client, "cf:dedup:pages", bits=8)
    crowd = [_digest(3, 4, 0xA0000000 + i) for i in range(30)]  # one page family: 4 pages of 9
    assert dedup.claim(crowd[:20], owner=7) == [True] * 20
    assert dedup.claim(crowd, owner=8) == [False] * 20 + [True] * 10
    assert dedup.claim(crowd, owner=7) == [True] * 20 + [False] * 10
    assert [dedup.owner_of(d) for d in crowd] == [7] * 20 + [8] * 10
    assert sorted(len(v) for v in client.hvals(dedup.bucket_key(crowd[0]))) == [21, 63, 63, 63]
    # a page holds suffix A + owner 00 00 07 + suffix B...: bytes "00 07 B0 B1" straddle two
    # records, so a digest with that suffix is a new URL, not a match
    pair = [_digest(5, 1, 0x11111111), _digest(5, 1, 0xB0B1B2B3)]
    assert dedup.claim(pair, owner=7) == [True, True]
    straddling = _digest(5, 1, 0x0007B0B1)
    assert dedup.claim([straddling], owner=9) == [True]
    assert dedup.owner_of(straddling) == 9 and dedup.owner_of(pair[1]) == 7


def test_owners_must_fit_three_bytes(redis_url):
    dedup = RunDedup(redis.Redis.from_url(redis_url), "cf:dedup:owner", bits=8)
    assert dedup.claim(digests("a"), owner=MAX_OWNER) == [True]
    with pytest.raises(ValueError, match="owner"):
        dedup.claim(digests("b"), owner=MAX_OWNER + 1)


def test_memory_per_url_at_a_run_sized_bucket_count(redis_url):
    """Redis's own figure (INFO used_memory) per claimed URL, at the bucket count extract picks
    for this many URLs; `python -m bench.scale dedup` measures it at 10 M."""
    from bench.scale import dedup_bytes_per_url
    measured = dedup_bytes_per_url(redis_url, urls=300_000)
    assert measured["urls"] == 300_000 and measured["bucket_bits"] == bucket_bits(1, 300_000)
    assert 7 <= measured["bytes_per_url"] <= 10  # 7 B is one record; below it claims went missing


def test_a_failing_claim_is_transient(tmp_path):
    path = tmp_path / "a.wat.gz"
    write_wat(path, [good_page(i) for i in range(20)])
    stage = ExtractStage(RunConfig.make(store=str(tmp_path / "store"), inputs=[str(path)]),
                         redis_client=redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TransientError):
        run_direct(stage, None, 0, out, wat=str(path))


def test_shards_split_across_batches(tmp_path, redis_url, monkeypatch):
    """Small claim batches, shards cut across them: rows in record order."""
    monkeypatch.setattr(extract, "CLAIM_BATCH", 5)
    path = tmp_path / "a.wat.gz"
    write_wat(path, [good_page(i) for i in range(60)])
    stage = ExtractStage(RunConfig.make(store=str(tmp_path / "store"), inputs=[str(path)], shard_size=17),
                         redis_client=redis.Redis.from_url(redis_url))
    out = tmp_path / "out"
    out.mkdir()
    result, _ = run_direct(stage, None, 0, out, wat=str(path))
    rows = [r for f in sorted(result.files.values()) for r in pq.read_table(f).to_pylist()]
    assert [len(pq.read_table(f)) for f in sorted(result.files.values())] == [17] * 7 + [1]
    with open_wat(str(path)) as source:
        assert [(r["url"], r["caption"], r["page_url"]) for r in rows] == list(extract_pairs(source, CFG, Counter()))


def test_a_batch_larger_than_one_call_is_split(redis_url, monkeypatch):
    from clipfleet.workers.extract import dedup as dedup_module
    monkeypatch.setattr(dedup_module, "MAX_BATCH", 7)
    dedup = RunDedup(redis.Redis.from_url(redis_url), "cf:dedup:split", bits=8)
    urls = [f"http://example.org/{i}.jpg" for i in range(30)]
    assert dedup.claim(digests(*urls[:20]), owner=1) == [True] * 20
    assert dedup.claim(digests(*urls), owner=2) == [False] * 20 + [True] * 10
