"""download_shard's own threading: every sample once, in order; a Redis outage stops the shard."""
from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from clipfleet.shared.pipeline import Stats, TransientError
from clipfleet.workers.download.blocklist import Blocklist
from clipfleet.workers.download.stage import FetchPool, Room, download_shard
from clipfleet.workers.download.fetch import FetchFailed
from clipfleet.workers.download.options import DownloadOptions


class FakeFetcher:
    """Fails every URL quickly (no image to resize); raises RedisError for one URL if asked."""
    limiter = None

    def __init__(self, redis_down_on: str | None = None):
        self.redis_down_on = redis_down_on
        self.fetched: list[str] = []
        self.threads: set[threading.Thread] = set()  # the threads that fetched
        self.lock = threading.Lock()

    def fetch(self, url: str) -> bytes:
        with self.lock:
            self.fetched.append(url)
            self.threads.add(threading.current_thread())
        if url == self.redis_down_on:
            raise RedisConnectionError("redis went away")
        time.sleep(0.001)
        raise FetchFailed(f"no image at {url}")


def test_every_sample_is_fetched_once_and_written_in_order(tmp_path):
    urls = [f"http://example.com/{i}.jpg" for i in range(300)]
    pool = FetchPool(7)
    fetched_by = []
    for shard in range(3):  # the same threads serve shard after shard
        fetcher = FakeFetcher()
        stats = Stats()
        download_shard(pa.table({"url": urls}), shard, tmp_path, fetcher, DownloadOptions(),
                       Blocklist.load(None), pool, 300, stats)
        assert sorted(fetcher.fetched) == sorted(urls)
        assert stats.get("count") == 300 and stats.get("failed_to_download") == 300
        fetched_by.append(fetcher.threads)
    # This pool's own threads, not the caller and not new ones per shard (other tests' pools
    # are alive too, so counting threads by name would prove nothing).
    threads = set().union(*fetched_by)
    assert threading.current_thread() not in threads
    assert 1 < len(threads) <= 7 and all(t.is_alive() and t.name.startswith("download-") for t in threads)


@pytest.mark.timeout(30)
def test_redis_outage_fails_the_shard_and_frees_its_threads(tmp_path):
    urls = [f"http://example.com/{i}.jpg" for i in range(2000)]
    pool = FetchPool(8)
    fetcher = FakeFetcher(redis_down_on=urls[5])
    with pytest.raises(TransientError):
        download_shard(pa.table({"url": urls}), 0, tmp_path, fetcher, DownloadOptions(),
                       Blocklist.load(None), pool, 2000, Stats())
    deadline = time.monotonic() + 5
    while pool.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.busy == 0  # no thread left fetching or waiting for room
    assert len(fetcher.fetched) < len(urls)  # the rest of the shard was not fetched


class ImageFetcher:
    """Serves a distinct small JPEG for every URL (its number drawn in), a few not images at all."""
    limiter = None

    def fetch(self, url: str) -> bytes:
        import cv2
        import numpy as np
        n = int(url.rsplit("/", 1)[1].split(".")[0])
        if n % 17 == 0:
            return b"<html>not an image</html>"
        img = np.full((40 + n % 50, 300, 3), n % 256, np.uint8)
        cv2.putText(img, str(n), (5, 30), cv2.FONT_HERSHEY_SIMPLEX, 1, (255, 255, 255), 2)
        return cv2.imencode(".jpg", img)[1].tobytes()


def test_resizing_threads_write_the_same_shard_as_one_thread(tmp_path, monkeypatch):
    urls = [f"http://example.com/{i}.jpg" for i in range(200)]
    written = {}
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("CLIPFLEET_RESIZE_THREADS", threads)
        out = tmp_path / threads
        out.mkdir()
        stats = Stats()
        download_shard(pa.table({"url": urls}), 4, out, ImageFetcher(), DownloadOptions(),
                       Blocklist.load(None), FetchPool(5), 200, stats)
        assert stats.get("success") == 200 - len(range(0, 200, 17))
        assert stats.get("failed_to_resize") == len(range(0, 200, 17))
        written[threads] = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith("_stats.json")}
    assert written["2"] == written["1"] and written["3"] == written["1"]  # same members, bytes and rows
    deadline = time.monotonic() + 5
    while any(t.name.startswith("resize-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("resize-")]  # they end with the shard


def _park(room: Room, woken: list[str], name: str) -> threading.Thread:
    """A thread waiting in `room.take`, returned once it is parked."""
    parker = threading.Lock()
    thread = threading.Thread(target=lambda: (room.take(parker), woken.append(name)))
    thread.start()
    deadline = time.monotonic() + 5
    while not parker.locked() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert parker.locked()
    return thread


@pytest.mark.timeout(30)
def test_room_gives_a_freed_place_to_the_thread_that_waited_last():
    room = Room(1)
    room.take(threading.Lock())  # the only place
    woken: list[str] = []
    threads = [_park(room, woken, name) for name in ("first", "second", "third")]  # each parked before the next
    for expected in (["third"], ["third", "second"]):
        room.give()
        deadline = time.monotonic() + 5
        while len(woken) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert woken == expected
    room.give(3)  # one for "first", two left free
    threads[0].join(5)
    assert woken == ["third", "second", "first"]
    room.take(threading.Lock())
    room.take(threading.Lock())  # both free places taken without waiting


@pytest.mark.timeout(30)
def test_room_wakes_a_waiting_thread_only_once_enough_places_are_free():
    room = Room(4, wake=2)
    for _ in range(4):
        room.take(threading.Lock())
    woken: list[str] = []
    first, second = _park(room, woken, "first"), _park(room, woken, "second")
    room.give()
    time.sleep(0.05)
    assert woken == []  # one place free: both still wait
    room.give()
    second.join(5)
    assert woken == ["second"]  # two free: the last to wait takes one, one is left
    room.take(threading.Lock())  # ...for a thread that is running to take without waiting
    room.give()
    time.sleep(0.05)
    assert woken == ["second"]
    room.open_all()  # the shard is over: everyone goes on, and nobody waits again
    first.join(5)
    assert woken == ["second", "first"]
    for _ in range(10):
        room.take(threading.Lock())
