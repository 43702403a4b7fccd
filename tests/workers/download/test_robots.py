"""robots.txt: fetched once per host for the fleet, obeyed before any request, RFC 9309 on errors."""
from __future__ import annotations

import pytest
import redis

from clipfleet.sandbox.hosts import TestHost
from clipfleet.workers.download.fetch import ROBOTS_MAX_BYTES, FetchFailed, Fetcher, user_agent
from clipfleet.workers.download.options import DownloadOptions
from clipfleet.workers.download.politeness import DomainLimiter, DomainLimits
from clipfleet.workers.download.robots import TTL_S
from tests.workers.download.test_fetch import RecordingConnect, resolver_mapping

IMAGE = b"\xff\xd8\xff\xe0 not decoded here"


def worker(redis_url: str | None, **options) -> Fetcher:
    """One download worker's fetcher; two of them on one Redis stand for two machines."""
    opts = DownloadOptions(**{"allow_private_addresses": True, "download_timeout": 2.0, **options})
    limiter = DomainLimiter(redis.Redis.from_url(redis_url), DomainLimits()) if redis_url else None
    return Fetcher(opts, limiter)


def outcome(fetcher: Fetcher, url: str) -> str:
    try:
        fetcher.fetch(url)
        return "fetched"
    except FetchFailed as exc:
        return exc.refused or str(exc)


@pytest.mark.parametrize("robots, path, options, expected", [
    ("User-agent: *\nDisallow: /private/\n", "/public/a.jpg", {}, "fetched"),
    ("User-agent: *\nDisallow: /private/\n", "/private/a.jpg", {}, "robots.txt"),
    ("User-agent: *\nDisallow: /*.jpg$\nAllow: /ok/*.jpg$\n", "/ok/a.jpg", {}, "fetched"),  # longest match wins
    ("User-agent: *\nDisallow: /*.jpg$\n", "/x/a.jpg", {}, "robots.txt"),
    ("User-agent: clipfleet\nDisallow: /\n", "/a.jpg", {}, "robots.txt"),          # by agent: ours
    ("User-agent: otherbot\nDisallow: /\n", "/a.jpg", {}, "fetched"),              # by agent: not ours
    # Our own group wins over *: an operator who lets us in lets us in.
    ("User-agent: *\nDisallow: /\n\nUser-agent: clipfleet\nAllow: /\n", "/a.jpg", {}, "fetched"),
    # The URLs came from CCBot's crawl: --robots-also CCBot obeys its group too (else *).
    ("User-agent: CCBot\nDisallow: /\n", "/a.jpg", {}, "fetched"),
    ("User-agent: CCBot\nDisallow: /\n", "/a.jpg", {"robots_also": ["CCBot"]}, "robots.txt"),
    ("User-agent: *\nDisallow: /\n", "/a.jpg", {"robots_also": ["CCBot"]}, "robots.txt"),
    # The first word of --user-agent-token names a group of its own.
    ("User-agent: mycrawl\nDisallow: /\n", "/a.jpg", {"user_agent_token": "mycrawl (mailto:me@example.org)"},
     "robots.txt"),
    ("User-agent: *\nDisallow: /\n", "/a.jpg", {"ignore_robots_txt": True}, "fetched"),
])
def test_rules_by_path_and_by_agent(robots, path, options, expected):
    with TestHost(image=IMAGE, robots=robots) as host:
        fetcher = worker(None, **options)
        assert outcome(fetcher, host.url + path) == expected
        assert host.stats[200] == (1 if expected == "fetched" else 0)  # a disallowed URL is never requested
        assert len(host.robots_requests) == (0 if options.get("ignore_robots_txt") else 1)


def test_the_robots_txt_request_says_who_we_are():
    with TestHost(image=IMAGE, robots="User-agent: *\nAllow: /\n") as host:
        worker(None, user_agent_token="mycrawl").fetch(host.url + "/a.jpg")
        assert host.robots_requests[0]["User-Agent"] == user_agent("mycrawl")
        assert "robots.txt" in host.robots_requests[0]["User-Agent"]


@pytest.mark.parametrize("status, expected", [
    (404, "fetched"), (410, "fetched"), (401, "fetched"),     # 4xx: no rules (RFC 9309 2.3.1.3)
    (500, "robots.txt unreachable"), (503, "robots.txt unreachable"),  # 5xx: complete disallow (2.3.1.4)
])
def test_missing_or_failing_robots_txt_follows_rfc_9309(status, expected):
    with TestHost(image=IMAGE, robots_status=status, retry_after="0") as host:
        fetcher = worker(None)
        fetcher.retry_backoff = 0.05
        assert outcome(fetcher, host.url + "/a.jpg") == expected
        assert outcome(fetcher, host.url + "/b.jpg") == expected  # the answer is cached
        assert host.stats[200] == (2 if expected == "fetched" else 0)


def test_a_slow_robots_txt_is_unreachable_and_disallows_for_a_while():
    with TestHost(image=IMAGE, robots="User-agent: *\nAllow: /\n", robots_delay_s=5) as host:
        fetcher = worker(None, download_timeout=0.5)
        with pytest.raises(FetchFailed, match="robots.txt unreachable .*timeout") as failed:
            fetcher.fetch(host.url + "/a.jpg")
        assert failed.value.refused == "robots.txt unreachable"
        assert host.stats[200] == 0


def test_a_huge_robots_txt_is_read_up_to_500_kib():
    early = "User-agent: *\nDisallow: /early/\n"
    padding = "# " + "x" * 1000 + "\n"
    filler = padding * ((ROBOTS_MAX_BYTES - len(early)) // len(padding) + 10)
    robots = early + filler + "Disallow: /late/\n" + padding * 2000  # about 2.5 MiB
    with TestHost(image=IMAGE, robots=robots) as host:
        fetcher = worker(None)
        assert outcome(fetcher, host.url + "/early/a.jpg") == "robots.txt"
        assert outcome(fetcher, host.url + "/late/a.jpg") == "fetched"  # past 500 KiB: not read


def test_fetched_once_for_the_whole_fleet_and_cached_with_an_expiry(redis_url):
    with TestHost(image=IMAGE, robots="User-agent: *\nDisallow: /private/\n") as host:
        a, b = worker(redis_url), worker(redis_url)
        assert outcome(a, host.url + "/a.jpg") == "fetched"
        assert outcome(b, host.url + "/private/b.jpg") == "robots.txt"  # b never asked the host
        assert outcome(b, host.url + "/c.jpg") == "fetched"
        assert len(host.robots_requests) == 1
        assert a.counts["robots_fetches"] == 1 and b.counts["robots_fetches"] == 0
        client = redis.Redis.from_url(redis_url)
        [key] = client.keys("clipfleet:robots:*")
        assert 0 < client.ttl(key) <= TTL_S <= 24 * 3600  # RFC 9309: cache for at most 24 h


def test_many_threads_of_many_workers_fetch_it_once(redis_url):
    import threading
    with TestHost(image=IMAGE, robots="User-agent: *\nAllow: /\n", robots_delay_s=0.3) as host:
        fetchers = [worker(redis_url) for _ in range(3)]
        results = []
        threads = [threading.Thread(target=lambda f=f, i=i: results.append(outcome(f, f"{host.url}/{i}.jpg")))
                   for i, f in enumerate(fetchers * 8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == ["fetched"] * 24 and len(host.robots_requests) == 1


def test_robots_txt_goes_through_the_address_guard():
    with TestHost(image=IMAGE, robots_location="http://meta.test/robots.txt") as host:
        connect = RecordingConnect()
        port = int(host.url.rsplit(":", 1)[1])
        fetcher = Fetcher(DownloadOptions(allow_private_addresses=True),
                          resolver=resolver_mapping({"img.test": "127.0.0.1", "meta.test": "169.254.169.254"}),
                          connect=connect)
        # Its robots.txt redirects to a name resolving to the cloud metadata address: refused
        # before connecting, so the robots.txt is unreachable and the host's URLs disallowed.
        with pytest.raises(FetchFailed, match="robots.txt unreachable .*private address 169.254.169.254") as failed:
            fetcher.fetch(f"http://img.test:{port}/a.jpg")
        assert failed.value.refused == "robots.txt unreachable"
        assert set(connect.attempts) == {("127.0.0.1", port)} and host.stats[200] == 0


@pytest.mark.parametrize("robots", ["User-agent: *\nCrawl-delay: 0.3\n", "User-agent: *\nRequest-rate: 10/3s\n"])
def test_crawl_delay_spaces_requests_for_every_worker(redis_url, robots):
    import threading
    with TestHost(image=IMAGE, robots=robots) as host:
        fetchers = [worker(redis_url), worker(redis_url)]  # two workers sharing the host's pace
        threads = [threading.Thread(target=fetchers[i % 2].fetch, args=(f"{host.url}/{i}.jpg",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        times = sorted(host.request_times)
    assert len(times) == 6
    assert (times[-1] - times[0]) / 5 > 0.25  # 0.3 s apart on average (one late wake-up may shorten one gap)


@pytest.mark.parametrize("robots", ["\x00\xff\xfe binary \x89PNG\r\n", "<html><body>Not found</body></html>",
                                    "Disallow: /before-any-group/\n", "User-agent: *\nDisallow: /" + "é" * 5000 + "\n"])
def test_a_robots_txt_of_junk_costs_no_image_and_no_crash(robots):
    with TestHost(image=IMAGE, robots=robots) as host:
        assert outcome(worker(None), host.url + "/a.jpg") == "fetched"
