"""Fetching one URL: the address guard, redirects, deadlines, limits, X-Robots-Tag, retries.

No test here opens a connection outside 127.0.0.0/8: names that must not be reached are
mapped by an injected resolver, and a connect hook records every connection attempt.
"""
from __future__ import annotations

import socket
import ssl
import threading

import pytest
import redis

from clipfleet.sandbox.server import METADATA_ADDRESS, METADATA_HOST
from clipfleet.workers.download.guard import AddressRefused, address_kind, checked_addresses
from clipfleet.workers.download.blocklist import Blocklist
from clipfleet.workers.download import fetch
from clipfleet.workers.download.fetch import FetchFailed, Fetcher, robots_refusal, user_agent
from clipfleet.workers.download.options import DownloadOptions
from clipfleet.workers.download.politeness import DomainLimiter, DomainLimits
from tests.workers.download.scripted import (read_request, replies, serve,  # noqa: F401 (serve: a fixture)
                                             tls_files_in, tls_server_script)


def resolver_mapping(names: dict[str, str]):
    """A getaddrinfo that answers `names` itself and passes IP literals through."""
    def resolve(host, port, *args, **kwargs):
        addr = names.get(host, host)
        if addr == host:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)  # literals only
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (addr, port))]
    return resolve


class RecordingConnect:
    def __init__(self):
        self.attempts = []

    def __call__(self, address, timeout):
        self.attempts.append(address)
        return socket.create_connection(address, timeout)


@pytest.mark.parametrize("addr, kind", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.7", "private"),
    ("172.16.5.5", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"),
    ("100.64.0.1", "non-global"), ("::ffff:127.0.0.1", "loopback"), ("fd00::1", "private"),
    ("93.184.216.34", None), ("2606:4700::1111", None),
])
def test_address_kinds(addr, kind):
    assert address_kind(addr) == kind


def test_a_name_with_one_internal_address_among_public_ones_is_refused():
    def resolve(host, port, *a, **k):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("93.184.216.34", "10.0.0.5")]
    with pytest.raises(AddressRefused, match="private address 10.0.0.5"):
        checked_addresses("mixed.example", 80, allow_private=False, resolver=resolve)
    assert checked_addresses("mixed.example", 80, allow_private=True, resolver=resolve) == ["93.184.216.34", "10.0.0.5"]


def test_without_the_flag_every_sandbox_url_is_refused_before_connecting(sandbox, truth, corner):
    connect = RecordingConnect()
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=False), connect=connect)
    urls = truth.column("url").to_pylist()[:10] + [c["url"] for c in corner]
    for url in urls:
        with pytest.raises(FetchFailed, match="private address 127.0.0.1 \\(loopback\\)") as failed:
            fetcher.fetch(url)
        assert failed.value.refused == "private address"
    assert connect.attempts == []


def test_redirect_to_a_name_resolving_to_link_local_is_refused_before_connecting_to_it(sandbox, corner):
    case = next(c for c in corner if c["case"] == "link_local_redirect")
    assert (case["resolve_host"], case["resolve_addr"]) == (METADATA_HOST, METADATA_ADDRESS)
    connect = RecordingConnect()
    # Loopback allowed for the sandbox itself; link-local is refused even so.
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True),
                      resolver=resolver_mapping({case["resolve_host"]: case["resolve_addr"]}), connect=connect)
    with pytest.raises(FetchFailed, match="private address 169.254.169.254 \\(link-local\\)") as failed:
        fetcher.fetch(case["url"])
    assert failed.value.refused == "private address"
    # The first hop only (its robots.txt may take a connection of its own, to the same address).
    assert set(connect.attempts) == {("127.0.0.1", sandbox.port)}


def test_allow_private_never_opens_link_local_multicast_or_unspecified():
    for addr in ("169.254.169.254", "224.0.0.1", "0.0.0.0", "fe80::1"):
        with pytest.raises(AddressRefused):
            checked_addresses("x.test", 80, allow_private=True, resolver=resolver_mapping({"x.test": addr}))
    for addr in ("127.0.0.1", "10.0.0.1", "192.168.1.1"):
        assert checked_addresses("x.test", 80, True, resolver_mapping({"x.test": addr})) == [addr]


@pytest.mark.parametrize("value, refused", [
    ("noai", "noai"), ("noimageai", "noimageai"), ("noindex, NoAI", "noai"),
    ("otherbot: noai", None), ("clipfleet: noimageai", "noimageai"), ("mytoken: noai", "noai"),
    ("noindex", None), ("nofollow, noarchive", None),
])
def test_x_robots_tag(value, refused):
    assert robots_refusal([value], {"clipfleet", "mytoken"}, {"noai", "noimageai"}) == refused


def test_user_agent_identifies_us_and_carries_the_token(recording_server):
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, user_agent_token="my-crawl; mailto:me@example.org"))
    fetcher.fetch(recording_server.url + "/image.jpg")
    ua = recording_server.requests[0][1]["User-Agent"]
    assert ua == user_agent("my-crawl; mailto:me@example.org")
    assert "clipfleet/" in ua and "my-crawl; mailto:me@example.org" in ua


def test_agent_specific_noai_for_our_token_is_honoured(recording_server):
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, user_agent_token="mycrawl"))
    with pytest.raises(FetchFailed, match="noai") as failed:
        fetcher.fetch(recording_server.url + "/robots-tag?mycrawl%3A%20noai")
    assert failed.value.refused == "x-robots-tag"
    assert fetcher.fetch(recording_server.url + "/robots-tag?otherbot%3A%20noai")  # not for us


def test_no_retry_for_404_or_an_opt_out_and_bounded_retries_for_5xx(recording_server):
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_retries=2))
    fetcher.retry_backoff = 0.05
    for path, keyword in (("/missing", "404"), ("/robots-tag?noai", "noai"), ("/overloaded", "500")):
        recording_server.requests.clear()
        with pytest.raises(FetchFailed, match=keyword):
            fetcher.fetch(recording_server.url + path)
        assert len(recording_server.requests) == (3 if path == "/overloaded" else 1), path


def test_a_503_is_retried_after_the_pause_while_the_deadline_allows_and_shared_with_the_fleet(
        recording_server, redis_url):
    client = redis.Redis.from_url(redis_url)
    limits = DomainLimits(max_concurrency=4, max_rate=0, slot_ttl=30, max_hold_off=60)
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_retries=0, download_timeout=2.5),
                      DomainLimiter(client, limits))
    with pytest.raises(FetchFailed, match="503 .*no time left to retry"):
        fetcher.fetch(recording_server.url + "/unavailable")
    # Retry-After: 1 each time, charged to a 2.5 s deadline: asked at 0, 1 and 2 s, not limited
    # by download_retries (0), which is for other transient failures.
    assert len(recording_server.requests) == 3
    assert fetcher.counts["throttled"] == 3 and fetcher.counts["throttled_retries"] == 2
    # A Retry-After beyond what we wait for fails at once, and holds the host off for every worker.
    recording_server.requests.clear()
    with pytest.raises(FetchFailed, match="429 .*retry after 3600s"):
        fetcher.fetch(recording_server.url + "/retry-much-later")
    assert len(recording_server.requests) == 1
    other_worker = DomainLimiter(redis.Redis.from_url(redis_url), limits)
    granted, wait = other_worker.try_acquire("127.0.0.1", "token")
    assert not granted and wait > 3000


def test_blocklisted_url_is_refused_without_a_request(recording_server):
    url = recording_server.url + "/bad.jpg"
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True), url_blocked=Blocklist.parse([url]).url_blocked)
    with pytest.raises(FetchFailed, match="blocklisted url") as failed:
        fetcher.fetch(url + "#fragment")
    assert failed.value.refused == "blocklist url" and recording_server.requests == []


def test_non_ascii_urls_are_percent_encoded(recording_server):
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True))
    fetcher.fetch(recording_server.url + "/caf\u00e9 cr\u00e8me.jpg?q=\u00e9t\u00e9")
    assert recording_server.requests[0][0] == "/caf%C3%A9%20cr%C3%A8me.jpg?q=%C3%A9t%C3%A9"


def test_a_hosts_checked_addresses_are_reused_and_so_are_refusals(recording_server):
    calls = []
    mapping = resolver_mapping({"img.test": "127.0.0.1", "meta.test": "169.254.169.254"})

    def counting(host, *args, **kwargs):
        calls.append(host)
        return mapping(host, *args, **kwargs)
    connect = RecordingConnect()
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True), resolver=counting, connect=connect)
    port = recording_server.server_address[1]
    for name in ("a", "b", "c"):
        assert fetcher.fetch(f"http://img.test:{port}/{name}.jpg")
    for _ in range(2):
        with pytest.raises(FetchFailed, match="private address 169.254.169.254") as failed:
            fetcher.fetch(f"http://meta.test:{port}/x.jpg")
        assert failed.value.refused == "private address"
    assert calls == ["img.test", "meta.test"]
    assert set(connect.attempts) == {("127.0.0.1", port)}
    assert [r[1]["Host"] for r in recording_server.requests] == [f"img.test:{port}"] * 3


@pytest.mark.parametrize("url", ["http://a b.test/x.jpg", "http://a\x00b.test/x.jpg", "http://a\"b.test/x.jpg"])
def test_a_host_name_that_cannot_go_into_a_header_is_refused_before_resolving(url):
    resolved = []
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True), resolver=lambda *a, **k: resolved.append(a))
    with pytest.raises(FetchFailed, match="unsupported url: bad host name"):
        fetcher.fetch(url)
    assert resolved == []


# -- over scripted servers: connection reuse, the request as sent, TLS

def test_fetcher_reuses_a_kept_alive_connection_and_recovers_from_a_stale_one(serve):
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    server = serve(replies(ok, ok, then_close=True))  # two answers, then it closes the connection
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_retries=0))
    url = f"http://127.0.0.1:{server.port}/a.jpg"
    assert [fetcher.fetch(url) for _ in range(3)] == [b"abc"] * 3
    # robots.txt and tdmrep.json take the first connection's two answers, the first two images the
    # second's; the third image found the kept one closed and asked on a new one
    assert server.connections == 3


def test_fetcher_sends_the_host_and_our_headers(serve):
    seen = []

    def script(conn):
        seen.append(read_request(conn))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    server = serve(script)
    Fetcher(DownloadOptions(allow_private_addresses=True)).fetch(f"http://127.0.0.1:{server.port}/p?q=1")
    assert seen[0].startswith(b"GET /robots.txt HTTP/1.1\r\n")  # asked first; its answer ("x") allows all
    head = seen[-1].decode()
    assert head.startswith("GET /p?q=1 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n" in head and "User-Agent: Mozilla/5.0 (compatible; clipfleet/" in head


def test_a_token_that_could_inject_headers_is_refused():
    with pytest.raises(ValueError, match="printable ASCII"):
        Fetcher(DownloadOptions(user_agent_token="me\r\nX-Evil: 1"))


@pytest.fixture
def tls_files(tmp_path):
    return tls_files_in(tmp_path)


def test_https_is_verified_and_fetched(serve, tls_files, monkeypatch):
    server = serve(tls_server_script(*tls_files, b"secure"))
    url = f"https://127.0.0.1:{server.port}/i.jpg"
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_retries=0))
    with pytest.raises(FetchFailed, match="tls error: .*certificate"):
        fetcher.fetch(url)  # self-signed: not trusted by the system's store (robots.txt is asked first)
    trusting = ssl.create_default_context(cafile=str(tls_files[0]))
    monkeypatch.setattr(fetch, "tls_context", lambda: trusting)
    # a new fetcher: the first one keeps the host's unreachable robots.txt for a while, as it should
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_retries=0))
    assert fetcher.fetch(url) == b"secure"


def test_a_silent_tls_peer_fails_at_the_deadline(serve):
    hung_up = threading.Event()
    release = threading.Event()

    def silent(conn):  # accepts, never says a word, hangs up only when the test is done
        release.wait(60)
        hung_up.set()
    server = serve(silent)
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_timeout=0.5, download_retries=0))
    try:
        with pytest.raises(FetchFailed, match="timeout: no complete response within 0.5s"):
            fetcher.fetch(f"https://127.0.0.1:{server.port}/i.jpg")
        assert not hung_up.is_set()  # the fetcher gave up on its own deadline, not when the peer left
    finally:
        release.set()


def test_an_operator_hold_in_redis_stops_every_request_to_the_host(recording_server, redis_url):
    # What ops/politeness.md tells an operator to run when a site asks the fleet to stop now.
    client = redis.Redis.from_url(redis_url)
    client.eval("local t = redis.call('TIME'); local u = t[1] + ARGV[1]; "
                "redis.call('HSET', KEYS[1], 'hold', u); redis.call('EXPIRE', KEYS[1], ARGV[1] + 60)",
                1, "clipfleet:polite:host:127.0.0.1", 2592000)
    fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, ignore_robots_txt=True),
                      DomainLimiter(client, DomainLimits()))
    with pytest.raises(FetchFailed, match="asked to wait .* over 120s"):
        fetcher.fetch(recording_server.url + "/a.jpg")
    assert recording_server.requests == []
    assert client.ttl("clipfleet:polite:host:127.0.0.1") > 2592000 - 10
