"""cpu-download: one URL shard -> images/NNNNN.tar, .parquet and _stats.json in img2dataset's layout.

Threads fetch (workers/fetch.py: guarded, bounded, polite) and hash; a couple of threads
decode, resize and encode (workers/resize.py) as results come and take the decoded picture's
perceptual hash (workers/phash.py: checked against the blocklist's and --decontaminate's); the
task's own thread writes them (workers/shard_writer.py). The outputs go to the stage's local
directory and are published by `execute` through Store.commit, so a worker killed mid-shard
leaves nothing visible.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from redis.exceptions import RedisError

from clipfleet.shared import layout
from clipfleet.shared.pipeline import Stage, StageOutput, Stats, TransientError
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from clipfleet.workers.app import broker_redis
from clipfleet.workers.download.blocklist import Blocklist
from clipfleet.workers.download import cores
from clipfleet.workers.download.consent import by_convention, run_warnings
from clipfleet.workers.download.donottrain import DoNotTrain, url_refusal
from clipfleet.workers.download.fetch import FetchFailed, Fetcher
from clipfleet.workers.download.options import DownloadOptions
from clipfleet.workers.download.phash import PhashList
from clipfleet.workers.download.politeness import DomainLimiter, DomainLimits
from clipfleet.workers.download.resize import ImageRejected, resize_image
from clipfleet.workers.download.writer import ShardWriter, sample_key

log = logging.getLogger("clipfleet.download")


@dataclass
class SampleResult:
    status: str                       # img2dataset's: success, failed_to_download, failed_to_resize
    error_message: str | None = None
    refused: str | None = None        # a deliberate refusal (private address, blocklist, noai)
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    sha256: str | None = None
    phash: str | None = None
    contaminated: bool | None = None  # None: the run has no --decontaminate set


def domain_limits(opts: DownloadOptions) -> DomainLimits:
    # A slot outlives the longest request it can cover, so only a dead worker's slot expires.
    return DomainLimits(max_concurrency=opts.domain_max_concurrency, max_rate=opts.domain_max_rate,
                        slot_ttl=opts.download_timeout + 30)


@dataclass
class Fetched:
    """Downloaded bytes that passed the blocklist, waiting for the CPU side."""
    data: bytes
    sha256: str


def fetch_sample(url: str | None, fetcher: Fetcher, blocklist: Blocklist) -> Fetched | SampleResult:
    """The network side of one URL: its bytes, or the result that says why there are none."""
    if not url:
        return SampleResult("failed_to_download", "no url")
    try:
        data = fetcher.fetch(url)
    except FetchFailed as exc:
        return SampleResult("failed_to_download", str(exc), refused=exc.refused)
    sha256 = hashlib.sha256(data).hexdigest()
    listed = blocklist.content_blocked(data, sha256)
    if listed:
        return SampleResult("failed_to_download", f"blocklisted {listed}", refused=f"blocklist {listed}")
    return Fetched(data, sha256)


def resize_sample(fetched: Fetched, opts: DownloadOptions, blocklist: Blocklist,
                  evalset: PhashList | None) -> SampleResult:
    """The CPU side: decode, check, resize, encode; then the picture's perceptual hash is checked
    against the blocklist's and the decontamination set's."""
    try:
        resized = resize_image(fetched.data, opts)
    except ImageRejected as exc:
        return SampleResult("failed_to_resize", str(exc))
    if blocklist.phash.match(resized.phash):
        return SampleResult("failed_to_download", "blocklisted phash", refused="blocklist phash")
    contaminated = None if evalset is None else evalset.match(resized.phash) is not None
    if contaminated and opts.decontaminate_mode == "drop":
        return SampleResult("failed_to_download", "matches the decontamination set", refused="decontaminated")
    return SampleResult("success", None, None, resized.data, resized.width, resized.height,
                        resized.original_width, resized.original_height, fetched.sha256, resized.phash,
                        contaminated)


def unexpected(url: str | None, exc: Exception) -> SampleResult:
    # A bug or an odd server must cost one sample, not the shard.
    log.error("unexpected error on %s", url, exc_info=exc)
    return SampleResult("failed_to_download", f"unexpected error: {exc.__class__.__name__}: {exc}")


def _fetch_in_thread(url, fetcher, blocklist) -> Fetched | SampleResult:
    try:
        return fetch_sample(url, fetcher, blocklist)
    except RedisError:
        raise  # the fleet's state is unreachable: the whole shard is retried later
    except Exception as exc:
        return unexpected(url, exc)


class Room:
    """Places for images fetched and not yet resized: bounds the bytes waiting in memory.

    A waiting fetcher is woken only once `wake` places are free, and it takes the next ones
    itself without waiting; woken, it fetches about `wake` images in a row. Waking one per
    place freed put each image through a park and an unpark (two context switches on a
    process's core, and a GIL hand-off each): waking per 32 of 128 halved the task thread's
    context switches and took ~8% off the workers' CPU on a fast host (bench.download). A
    place given back goes to the thread that began waiting last (a stack, not a queue), so on
    a fast host a few threads do the fetching with warm connections while the rest sleep. On
    a slow host the room never fills: nobody waits and every thread is in flight."""

    def __init__(self, places: int, wake: int = 1):
        self._free = places
        self._wake = max(1, min(wake, places))
        self._parked: list[threading.Lock] = []
        self._lock = threading.Lock()

    def take(self, parker: threading.Lock) -> None:
        """Wait for a place; `parker` is the calling thread's own lock, held while it waits."""
        with self._lock:
            if self._free:
                self._free -= 1
                return
            parker.acquire()
            self._parked.append(parker)
        parker.acquire()  # until give() releases it
        parker.release()

    def give(self, places: int = 1) -> None:
        with self._lock:
            self._free += places
            while self._parked and self._free >= self._wake:
                self._free -= 1
                self._parked.pop().release()

    def open_all(self) -> None:
        """The shard is over: every waiting thread goes on (to see it is stopping), and none waits again."""
        with self._lock:
            self._free += len(self._parked) + (1 << 30)
            while self._parked:
                self._parked.pop().release()


def _fetch_loop(rows: list[dict], todo, results: queue.SimpleQueue, room: Room,
                stopping: threading.Event, fetcher: Fetcher, blocklist: Blocklist) -> None:
    """One fetching thread: take the next index, fetch it, hand (index, result) to the consumer.

    Plain threads, C-level queues and locks, not an executor: a Future, as_completed and a
    Python-level Semaphore per sample cost measurable CPU and GIL hand-offs at ~1000 images/s."""
    parker = threading.Lock()
    for index in todo:  # shared iterator: next() on it is atomic under the GIL
        room.take(parker)  # a place given back by the consumer: bounds fetched bytes waiting in memory
        if stopping.is_set():  # the shard ended early (time limit, Redis gone): fetch nothing more
            return
        try:
            results.put((index, _fetch_in_thread(rows[index].get("url"), fetcher, blocklist)))
        except RedisError as exc:
            results.put((index, exc))


class FetchPool:
    """Fetching threads that outlive a shard.

    Starting 64 threads for every shard cost the CPU thread ~40 ms of waiting for each to
    come up; these start once per process (lazily, so after a worker forks) and take each
    shard's fetch loop as a job. Stages share them through `shared_pool`."""

    def __init__(self, size: int):
        self.size = max(1, size)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pid: int | None = None
        self._lock = threading.Lock()
        self.busy = 0  # threads running a job

    def run_everywhere(self, job) -> None:
        """Start `job` in every thread of the pool (in each as soon as it is free)."""
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                for n in range(self.size):
                    threading.Thread(target=self._serve, name=f"download-{n}", daemon=True).start()
        for _ in range(self.size):
            self._jobs.put(job)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            with self._lock:
                self.busy += 1
            try:
                job()
            finally:
                with self._lock:
                    self.busy -= 1


@functools.cache
def shared_pool(size: int) -> FetchPool:
    """This process's pool of `size` threads: a worker serving many runs keeps one, not one a run."""
    return FetchPool(size)


def resize_threads() -> int:
    """Threads resizing one shard: CLIPFLEET_RESIZE_THREADS, by default 2 on a machine with 2 cores
    or more. The fleet runs a download process per core, but a run of one shard (any run under
    --shard-size samples), a shard's tail or a neighbour between shards leaves cores idle, and
    cv2 lets go of the GIL while it decodes and encodes: with 2, one shard of 3000 images took
    4.5 s instead of 5.3 s on 2 busy cores, and 6 shards on 2 processes no longer (2.26 s vs
    2.44 s). Not one per core: 64 processes of 64 threads would be 4096 runnable threads.
    A process held on its home core (cores.py) sees one core: its shard is resized in the
    task's own thread, two CPU-bound threads on one core would only take turns."""
    own = os.environ.get("CLIPFLEET_RESIZE_THREADS")
    if own:
        return max(1, int(own))
    return min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _resize_one(rows: list[dict], index: int, fetched: Fetched, opts: DownloadOptions, blocklist: Blocklist,
                evalset: PhashList | None) -> SampleResult:
    try:
        return resize_sample(fetched, opts, blocklist, evalset)
    except Exception as exc:
        return unexpected(rows[index].get("url"), exc)


def _resize_loop(results: queue.SimpleQueue, ready: queue.SimpleQueue, rows: list[dict],
                 opts: DownloadOptions, blocklist: Blocklist, evalset: PhashList | None) -> None:
    """A resizing thread: what the fetchers hand over, resized, to the writing thread; None ends it."""
    while (item := results.get()) is not None:
        index, result = item
        if isinstance(result, Fetched):
            result = _resize_one(rows, index, result, opts, blocklist, evalset)
        ready.put((index, result))


def download_shard(urls: pa.Table, shard: int, out: Path, fetcher: Fetcher, opts: DownloadOptions,
                   blocklist: Blocklist, pool: FetchPool, shard_size: int, stats_out: Stats,
                   evalset: PhashList | None = None, home: cores.HomeCore | None = None) -> StageOutput:
    """Fetch in the pool's threads; decode/resize/encode in resize_threads() threads (in this one
    when that is 1), as results come; write in this one.

    A few CPU threads per process (the fleet runs a process per core) measured faster than
    resizing in every fetching thread: runnable threads fight over the GIL and caches.
    `home`, checked as results come, keeps the process on one core while the others are busy."""
    started = time.time()
    rows = urls.to_pylist()
    writer = ShardWriter(out, shard, urls.schema, opts.encode_format)
    counts, refused, contaminated = Counter(), Counter(), 0
    results, room, stopping = queue.SimpleQueue(), Room(2 * pool.size, wake=pool.size // 2), threading.Event()
    todo = iter(range(len(rows)))
    pool.run_everywhere(functools.partial(_fetch_loop, rows, todo, results, room, stopping, fetcher, blocklist))
    helpers = resize_threads()
    ready = results
    if helpers > 1:
        ready = queue.SimpleQueue()
        for n in range(helpers):
            threading.Thread(target=_resize_loop, args=(results, ready, rows, opts, blocklist, evalset),
                             daemon=True, name=f"resize-{n}").start()
    try:
        for _ in range(len(rows)):
            index, result = ready.get()
            if home is not None:
                home.check()
            if isinstance(result, RedisError):
                raise TransientError(f"redis unreachable for politeness: {result}") from result
            if isinstance(result, Fetched):
                result = _resize_one(rows, index, result, opts, blocklist, evalset)
            room.give()
            counts[result.status] += 1
            if result.refused:
                refused[result.refused] += 1
            contaminated += bool(result.contaminated)
            meta = {**rows[index], "key": sample_key(index, shard, shard_size), "status": result.status,
                    "error_message": result.error_message, "width": result.width, "height": result.height,
                    "original_width": result.original_width, "original_height": result.original_height,
                    "sha256": result.sha256, "phash": result.phash, "contaminated": result.contaminated}
            writer.add(index, meta, result.image)
            stats_out.advance()  # a running shard's progress, for `clipfleet run` and status
    finally:
        # On a soft time limit or an error, do not wait for stragglers; free threads waiting for room.
        stopping.set()
        room.open_all()
        if helpers > 1:
            for _ in range(helpers):
                results.put(None)
        if fetcher.limiter is not None:
            fetcher.limiter.flush()
    ended = time.time()
    stats_out.samples_in(len(rows))
    stats_out.kept(counts["success"])
    stats_out.add("count", len(rows))
    stats_out.add("success", counts["success"])
    for reason in ("failed_to_download", "failed_to_resize"):
        stats_out.drop(reason, counts[reason])
    for reason, n in sorted(refused.items()):
        stats_out.drop(reason, n, under="refused")
    if evalset is not None:  # kept but marked; dropped ones are counted under refused
        stats_out.add("contaminated", contaminated)
    for convention, n in by_convention(refused).items():  # the same refusals, by opt-out convention
        stats_out.add(convention, n, under="consent")
    # img2dataset's _stats.json says "successes" where its status_dict says "success"
    summary = {"count": len(rows), "successes": counts["success"],
               "failed_to_download": counts["failed_to_download"], "failed_to_resize": counts["failed_to_resize"],
               "refused": dict(sorted(refused.items())), "consent": by_convention(refused),
               "duration": ended - started,
               "start_time": started, "end_time": ended}
    files = writer.close(summary)
    return StageOutput(files=files)


class DownloadStage(Stage):
    name = "download"

    def __init__(self, run: RunConfig, limiter: DomainLimiter | None = None,
                 resolver=socket.getaddrinfo, connect=socket.create_connection):
        super().__init__(run)
        self.blocklist = Blocklist.load(self.options.blocklist)
        self.do_not_train = DoNotTrain.load(self.options.do_not_train)
        # Hashed once per worker process; a large set is better passed as a parquet of its hashes.
        self.evalset = (PhashList.load(self.options.decontaminate, self.options.decontaminate_distance)
                        if self.options.decontaminate else None)
        self._limiter = limiter
        self._resolver, self._connect = resolver, connect
        self._fetcher: Fetcher | None = None
        self.pool = shared_pool(self.options.download_threads)

    def fetcher(self) -> Fetcher:
        # Built on first use, inside the worker process, where the broker's Redis is reachable.
        if self._fetcher is None:
            if self.options.ignore_robots_txt:
                log.warning("robots.txt is IGNORED in this run (--ignore-robots-txt): site operators' "
                            "robots.txt rules are neither fetched nor obeyed; X-Robots-Tag opt-outs, "
                            "the blocklist and the address guard still hold")
            limiter = self._limiter or DomainLimiter(broker_redis(), domain_limits(self.options))
            run_warnings(self.options, limiter.redis, f"{self.run_config.store}:{self.run_config.created_at}")
            honoured = "do-not-train" not in self.options.not_honoured
            self._fetcher = Fetcher(self.options, limiter, self._resolver, self._connect,
                                    url_blocked=url_refusal(self.blocklist, self.do_not_train, honoured))
        return self._fetcher

    def run(self, store: Store, shard: int, out: Path, stats: Stats) -> StageOutput:
        with store.open(layout.url_shard(shard)) as f:
            # ParquetFile, not read_table: read_table imports pyarrow.dataset and pandas, ~0.3 s
            # of CPU on the first shard of every pool process, for a file read whole anyway.
            urls = pq.ParquetFile(f).read()
        fetcher = self.fetcher()
        waited_before = fetcher.limiter.waited_s if fetcher.limiter is not None else 0.0
        counts_before = fetcher.counted()
        output = download_shard(urls, shard, out, fetcher, self.options, self.blocklist,
                                self.pool, self.run_config.input.shard_size, stats, self.evalset,
                                home=cores.this_process())
        if fetcher.limiter is not None:  # thread-seconds spent waiting for a polite turn
            stats.put("politeness_wait_s", round(fetcher.limiter.waited_s - waited_before, 1))
        for name, value in sorted(fetcher.counted().items()):  # 429/503s, retries, robots.txt fetches
            delta = value - counts_before.get(name, 0)
            if name == "robots_seconds":
                stats.put("robots_txt_s", round(delta, 2))
            elif name == "tdmrep_seconds":
                stats.put("tdmrep_json_s", round(delta, 2))
            elif delta:
                stats.add(name, int(delta), under="politeness")
        return output
