"""Per-host politeness shared through Redis: two limiters stand for two workers of the fleet."""
from __future__ import annotations

import threading
import time

import pytest
import redis

from clipfleet.workers.download.politeness import DomainLimiter, DomainLimits, HostHeldOff


def limiter(redis_url: str, **limits) -> DomainLimiter:
    return DomainLimiter(redis.Redis.from_url(redis_url), DomainLimits(**limits))


def acquire_within(lim: DomainLimiter, host: str, seconds: float) -> str:
    """lim.acquire(host), failing the test if it has not returned within `seconds` (a bound on
    a hang, no speed assertion)."""
    done: list = []
    thread = threading.Thread(target=lambda: done.append(lim.acquire(host)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert done, f"acquire({host!r}) still waiting after {seconds}s"
    return done[0]


def test_concurrency_limit_holds_across_workers(redis_url):
    a, b = limiter(redis_url, max_concurrency=2, max_rate=0), limiter(redis_url, max_concurrency=2, max_rate=0)
    assert a.try_acquire("img.example", "a1")[0]
    assert b.try_acquire("img.example", "b1")[0]
    assert not a.try_acquire("img.example", "a2")[0]
    assert b.try_acquire("other.example", "b2")[0]  # limits are per host
    a.release("img.example", "a1")  # goes to Redis with a's next acquire, or its flush
    assert not b.try_acquire("img.example", "b3")[0]
    a.try_acquire("third.example", "a3")
    assert b.try_acquire("img.example", "b3")[0]
    b.release("img.example", "b3")
    b.flush()
    assert a.try_acquire("img.example", "a4")[0]


def test_slots_of_a_killed_worker_expire(redis_url):
    dead = limiter(redis_url, max_concurrency=1, max_rate=0, slot_ttl=1)
    assert dead.try_acquire("img.example", "never-released")[0]  # its worker dies holding it
    alive = limiter(redis_url, max_concurrency=1, max_rate=0, slot_ttl=1)
    assert not alive.try_acquire("img.example", "t")[0]
    acquire_within(alive, "img.example", 15)  # returns once the dead worker's slot has expired


def test_an_explicit_rate_cap_reserves_start_times_one_interval_apart_never_far_ahead(redis_url):
    a, b = limiter(redis_url, max_concurrency=0, max_rate=10), limiter(redis_url, max_concurrency=0, max_rate=10)
    answers = [(a if i % 2 else b).try_acquire("img.example", f"t{i}") for i in range(8)]
    # The first caller starts now; each later one is handed the next start, one interval after
    # the last (Redis time), but never one further than the horizon (0.05 s) ahead: a hold-off
    # set meanwhile must still stop them. Those are told when to ask again instead.
    assert answers[0] == (True, 0.0)
    for granted, wait in answers[1:]:
        assert (wait <= 0.051) if granted else (0 < wait <= 0.1)
    assert not all(granted for granted, _ in answers)
    time.sleep(0.1)
    granted, wait = a.try_acquire("img.example", "t9")
    assert granted and wait <= 0.05


def test_hold_off_from_retry_after_applies_to_every_worker(redis_url):
    a = limiter(redis_url, max_concurrency=4, max_rate=0, max_hold_off=30)
    b = limiter(redis_url, max_concurrency=4, max_rate=0, max_hold_off=30)
    a.hold_off("img.example", 1)
    granted, wait = b.try_acquire("img.example", "t")
    assert not granted and 0 < wait <= 1
    acquire_within(b, "img.example", 15)  # waits the hold-off out, then gets a slot
    a.hold_off("img.example", 600)
    with pytest.raises(HostHeldOff, match="Retry-After"):
        b.acquire("img.example")


def test_many_threads_never_exceed_the_limit(redis_url):
    limits = dict(max_concurrency=3, max_rate=0, slot_ttl=30)
    workers = [limiter(redis_url, **limits) for _ in range(2)]
    in_flight, peak, lock = [0], [0], threading.Lock()

    def request(w: DomainLimiter):
        with w.slot("img.example"):
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            time.sleep(0.02)
            with lock:
                in_flight[0] -= 1

    threads = [threading.Thread(target=request, args=(workers[i % 2],)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= peak[0] <= 3
