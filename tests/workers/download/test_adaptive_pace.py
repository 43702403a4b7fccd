"""The adaptive per-host pace, as the Lua script in Redis decides it from what requests report."""
from __future__ import annotations

import time

import redis

from clipfleet.workers.download.politeness import ERROR, OK, THROTTLED, DomainLimiter, DomainLimits

HOST = "img.example"


def limiter(redis_url: str, **limits) -> DomainLimiter:
    return DomainLimiter(redis.Redis.from_url(redis_url), DomainLimits(**{"reuse_s": 0, **limits}))


def serve(lim: DomainLimiter, n: int, latency: float = 0.01, outcome: str = OK, retry_after: float | None = None):
    """n requests that the host answers this way."""
    for _ in range(n):
        token = lim.acquire(HOST)
        lim.release(HOST, token, outcome, latency, retry_after)
    lim.flush()


def starts(lim: DomainLimiter, n: int) -> list[float]:
    """Monotonic start times of n back-to-back requests (each waits its turn)."""
    times = []
    for _ in range(n):
        token = lim.acquire(HOST)
        times.append(time.monotonic())
        lim.release(HOST, token, OK, 0.01)
    return times


def test_a_host_that_answers_well_is_never_paced(redis_url):
    lim = limiter(redis_url)
    serve(lim, 200, latency=0.002)
    state = lim.state(HOST)
    assert "rmax" not in state and abs(state["srtt"] - 0.002) < 1e-3
    granted, wait = lim.try_acquire(HOST, "t")
    assert granted and wait == 0.0


def test_a_429_pauses_the_host_for_every_worker_and_cuts_its_pace_to_what_it_served(redis_url):
    a, b = limiter(redis_url), limiter(redis_url)
    serve(a, 30)  # about 30 ok in well under a second: it served ~30/s lately (1 s decay)
    served = a.state(HOST)["okr"]
    token = a.acquire(HOST)
    a.release(HOST, token, THROTTLED, 0.0, retry_after=0.5)  # told to the fleet at once
    granted, wait = b.try_acquire(HOST, "b1")
    assert not granted and 0 < wait <= 0.5
    state = b.state(HOST)
    assert state["beta"] == 0.7 and 0.3 * served < state["rmax"] <= served
    time.sleep(0.55)
    t = starts(b, 7)
    expected = 1 / (0.7 * state["rmax"])  # the rate right after a cut
    # Starts are reserved one interval apart; a thread that wakes late does not push the next
    # one back, so single gaps vary with the scheduler and their mean is what the pace holds.
    mean_gap = (t[-1] - t[1]) / (len(t) - 2)
    assert 0.7 * expected < mean_gap < 1.6 * expected, (mean_gap, expected)


def test_a_burst_of_refusals_cuts_once_and_errors_cut_less(redis_url):
    lim = limiter(redis_url)
    serve(lim, 20)
    serve(lim, 10, outcome=THROTTLED, retry_after=0.01)  # requests that were all in flight together
    first = lim.state(HOST)
    other = limiter(redis_url, max_concurrency=16)
    serve(other, 5, outcome=THROTTLED, retry_after=0.01)
    assert lim.state(HOST)["cut"] == first["cut"] and lim.state(HOST)["rmax"] == first["rmax"]

    lim2 = limiter(redis_url)
    HOST2 = "slow.example"
    token = lim2.acquire(HOST2)
    lim2.release(HOST2, token, ERROR)  # a timeout or a refused connection
    assert lim2.state(HOST2)["beta"] == 0.85


def test_latency_rising_above_the_hosts_own_baseline_slows_it(redis_url):
    lim = limiter(redis_url)
    serve(lim, 20, latency=0.02)
    assert "rmax" not in lim.state(HOST)
    serve(lim, 10, latency=0.5)  # queueing at the host: 25x its baseline
    state = lim.state(HOST)
    assert state["beta"] == 0.9 and state["base"] < 0.05 and state["srtt"] > 0.1


def test_the_pace_grows_back_along_a_cubic_and_ends(redis_url):
    lim = limiter(redis_url)
    client = redis.Redis.from_url(redis_url)
    key = f"clipfleet:polite:host:{HOST}"

    def redis_now() -> float:
        seconds, micros = client.time()
        return seconds + micros / 1e6

    def rate_after(seconds: float) -> float:
        now = redis_now()
        client.hset(key, mapping={"rmax": 10.0, "beta": 0.7, "cut": now - seconds, "next": 0})
        t = starts(lim, 5)
        return 3 / (t[4] - t[1]) if t[4] > t[1] else float("inf")  # a mean: single gaps jitter

    assert 5 < rate_after(0.0) < 9          # 0.7 x 10/s right after the cut
    assert 8 < rate_after(2.0) < 12.5       # back at 10/s after K = 2 s, flat around it
    assert 15 < rate_after(5.0) < 30        # probing above: 10 x (1 + 0.3 x 1.5^3) = 20/s
    client.hset(key, mapping={"cut": redis_now() - 60})
    granted, wait = lim.try_acquire(HOST, "late")  # 8x past where it was cut: unpaced again
    assert granted and wait == 0.0


def test_an_explicit_cap_still_holds_over_an_unpaced_host(redis_url):
    lim = limiter(redis_url, max_rate=20)
    t = starts(lim, 6)
    assert (t[-1] - t[0]) / 5 > 0.045  # 0.05 s apart on average (a late wake-up may shorten one gap)


def test_per_host_state_expires_and_costs_a_few_hundred_bytes(redis_url):
    lim = limiter(redis_url, state_ttl=30)
    for i in range(50):
        host = f"h{i}.example"
        token = lim.acquire(host)
        lim.release(host, token, THROTTLED if i % 2 else OK, 0.05, retry_after=0.01)
    lim.flush()
    client = redis.Redis.from_url(redis_url)
    hashes = client.keys("clipfleet:polite:host:*")
    assert len(hashes) == 50
    for key in hashes:
        assert 0 < client.pttl(key) <= 30_000
        assert client.memory_usage(key) < 400
    for key in client.keys("clipfleet:polite:slots:*"):
        assert client.pttl(key) > 0  # empty sets vanish; any left behind expire
