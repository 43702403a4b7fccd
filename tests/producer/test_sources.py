"""What the producer reads before anything runs (WAT inputs: paths, globs, a crawl's listing),
and its backpressure while it enqueues."""
from __future__ import annotations

import gzip
import http.server
import threading
import time

import pytest
import redis

from clipfleet.producer import feed
from clipfleet.producer.feed import enqueue
from clipfleet.producer.register import FirstTask
from clipfleet.producer.sources import crawl_inputs, wat_inputs
from clipfleet.shared.storage import Store

CRAWL = "CC-MAIN-2024-10"
LISTING = [f"crawl-data/{CRAWL}/segments/{i:03d}/wat/CC-MAIN-{i:05d}.warc.wat.gz" for i in range(20)]


def test_wat_inputs_local_paths_and_globs(tmp_path):
    for name in ("b.wat.gz", "a.wat.gz", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    got = wat_inputs([str(tmp_path / "*.wat.gz"), str(tmp_path / "a.wat.gz"),
                      "https://example.org/x.wat.gz", "s3://bucket/y.wat.gz"])
    assert got == [str(tmp_path / "a.wat.gz"), str(tmp_path / "b.wat.gz"),
                   "https://example.org/x.wat.gz", "s3://bucket/y.wat.gz"]


@pytest.mark.parametrize("spec, message", [
    ("missing.wat.gz", "not found"), ("nothing-*.wat.gz", "no WAT files match"),
    ("ftp://example.org/a.wat.gz", "cannot read WAT files")])
def test_wat_inputs_errors_are_clear(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        wat_inputs([spec if "://" in spec else str(tmp_path / spec)])


@pytest.fixture
def fake_common_crawl(monkeypatch, tmp_path):
    """A local server with one crawl's wat.paths.gz; CLIPFLEET_CC_BASE points at it."""
    listing = tmp_path / "crawl-data" / CRAWL / "wat.paths.gz"
    listing.parent.mkdir(parents=True)
    listing.write_bytes(gzip.compress(("\n".join(LISTING) + "\n").encode()))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("CLIPFLEET_CC_BASE", base)
    yield base
    server.shutdown()


def test_crawl_inputs_first_n_and_seeded_sample(fake_common_crawl):
    assert crawl_inputs(CRAWL, 3) == [f"{fake_common_crawl}/{p}" for p in LISTING[:3]]
    sample = crawl_inputs(CRAWL, 5, seed=42)
    assert sample == crawl_inputs(CRAWL, 5, seed=42) != crawl_inputs(CRAWL, 5, seed=43)
    assert len(set(sample)) == 5
    positions = [LISTING.index(u.removeprefix(f"{fake_common_crawl}/")) for u in sample]
    assert positions == sorted(positions)


def test_crawl_unreachable_says_so_in_one_line(monkeypatch):
    from clipfleet.producer.fleet import free_port
    monkeypatch.setenv("CLIPFLEET_CC_BASE", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ValueError) as caught:
        crawl_inputs(CRAWL, 1)
    message = str(caught.value)
    assert message.startswith("Common Crawl cannot be reached at http://127.0.0.1:")
    assert "Connection refused" in message and "CLIPFLEET_CC_BASE" in message and "\n" not in message


@pytest.mark.parametrize("crawl, count, message", [
    (CRAWL, 21, "has 20 WAT segments"), (CRAWL, 0, "at least 1"),
    ("CC-MAIN-2099-01", 1, "no WAT listing"), ("not-a-crawl", 1, "not a crawl id")])
def test_crawl_inputs_errors(fake_common_crawl, crawl, count, message):
    with pytest.raises(ValueError, match=message):
        crawl_inputs(crawl, count)


def test_backpressure_holds_the_queue_at_the_high_water_mark(redis_url, tmp_path, monkeypatch):
    """No worker consumes; the feeder must stop at 3 queued tasks and go on as they leave."""
    from clipfleet.workers.app import make_app
    monkeypatch.setattr(feed, "HIGH_WATER", 3)
    client = redis.Redis.from_url(redis_url)
    store = Store(str(tmp_path / "store"))
    tasks = [FirstTask("extract", i, {"wat": f"/w/{i}.wat.gz"}) for i in range(8)]
    store.commit("extract", 0, {}, {})  # segment 0 is done already: not sent
    sent = []
    feeder = threading.Thread(target=lambda: sent.append(
        enqueue(make_app(redis_url), client, store, tasks)), daemon=True)
    feeder.start()
    lengths, consumed, peak = [], 0, 0
    deadline = time.monotonic() + 60
    while feeder.is_alive() and time.monotonic() < deadline:
        length = client.llen("cpu-extract")
        lengths.append(length)
        peak = max(peak, length)
        if length == 3 and lengths.count(3) > 5:  # held at the mark for a while: take one
            client.rpop("cpu-extract")
            consumed += 1
            lengths.clear()
        time.sleep(0.1)
    feeder.join(1)
    assert sent == [7]
    assert peak == 3 and consumed >= 4
    assert consumed + client.llen("cpu-extract") == 7
