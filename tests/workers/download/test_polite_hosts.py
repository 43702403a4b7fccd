"""Whole shards against hosts with a temper (sandbox/hosts.py), with the default politeness."""
from __future__ import annotations

import multiprocessing
from urllib.parse import urlsplit

import pytest

from clipfleet.sandbox.hosts import OPT_OUT_BODY_BYTES, TestHost
from clipfleet.shared.pipeline import execute
from clipfleet.shared.storage import Store
from clipfleet.workers.download.fetch import FetchFailed, Fetcher
from clipfleet.workers.download.options import DownloadOptions
from tests.workers.download.conftest import make_run, make_stage, url_table, write_url_shard
from tests.workers.download.test_stage import outputs

# The defaults a user gets, not the generous ones other download tests use.
DEFAULTS = {"domain_max_concurrency": 16, "domain_max_rate": 0.0, "download_timeout": 10.0}


def image_urls(host: TestHost, truth, n: int) -> list[str]:
    paths = [urlsplit(u).path for u in truth.column("url").to_pylist()]
    return [host.url + paths[i % len(paths)] + f"?copy={i}" for i in range(n)]


def run_shard(tmp_path, redis_url, urls, shard=0, **options):
    store_uri = str(tmp_path / "store")
    cfg = make_run(store_uri, **{**DEFAULTS, **options})
    store = Store(store_uri)
    write_url_shard(store, shard, url_table(urls))
    marker = execute(make_stage(cfg, redis_url), store, shard)
    rows, _ = outputs(store, shard)
    return rows, marker["stats"]


@pytest.mark.timeout(180)
def test_a_capacity_limited_host_is_paced_to_what_it_takes_and_loses_nothing(tmp_path, redis_url, world, truth):
    with TestHost(world / "web", capacity=40, burst=40, base_latency=0.005) as host:
        rows, stats = run_shard(tmp_path, redis_url, image_urls(host, truth, 240))
    assert [r["status"] for r in rows] == ["success"] * 240, {r["error_message"] for r in rows}
    refused = host.stats[429]
    assert stats["politeness"].get("throttled", 0) == refused  # every 429 is counted ...
    assert stats["politeness"].get("throttled_retries", 0) == refused  # ... and was asked again
    assert refused / (refused + 240) <= 0.15, host.stats  # it slowed down instead of hammering


@pytest.mark.timeout(180)
def test_a_host_that_fails_with_503_mid_run_and_recovers(tmp_path, redis_url, world, truth):
    with TestHost(world / "web", outage_after=40, outage_s=1.5, retry_after="1") as host:
        rows, stats = run_shard(tmp_path, redis_url, image_urls(host, truth, 150))
    assert [r["status"] for r in rows] == ["success"] * 150
    assert host.stats[503] >= 1 and stats["politeness"]["throttled"] == host.stats[503]
    assert stats["politeness"]["throttled_retries"] == host.stats[503]


def _download_in_a_process(store_uri: str, redis_url: str, shard: int) -> None:
    from clipfleet.shared.runconfig import RunConfig
    cfg = RunConfig.load(Store(store_uri))
    execute(make_stage(cfg, redis_url), Store(store_uri), shard)


@pytest.mark.timeout(180)
def test_two_download_processes_share_one_hosts_budget(tmp_path, redis_url, world, truth):
    store_uri = str(tmp_path / "store")
    make_run(store_uri, **{**DEFAULTS, "domain_max_concurrency": 3})
    with TestHost(world / "web", base_latency=0.03) as host:
        urls = image_urls(host, truth, 80)
        for shard in (0, 1):
            write_url_shard(Store(store_uri), shard, url_table(urls[shard * 40:(shard + 1) * 40]))
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_download_in_a_process, args=(store_uri, redis_url, s)) for s in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(150)
        assert [p.exitcode for p in procs] == [0, 0]
    for shard in (0, 1):
        rows, _ = outputs(Store(store_uri), shard)
        assert [r["status"] for r in rows] == ["success"] * 40
    # 2 processes x 64 threads wanted the host; the fleet-wide cap held it at 3 in flight.
    assert host.stats["peak_in_flight"] == 3


def test_an_x_robots_tag_opt_out_stops_the_read_when_the_headers_arrive(world):
    with TestHost(image=b"unused") as host:
        fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_timeout=30))
        with pytest.raises(FetchFailed, match="X-Robots-Tag: noai") as failed:
            fetcher.fetch(host.url + "/opt-out/a.jpg")
        assert failed.value.refused == "x-robots-tag"
    # 64 MiB announced and offered; what left the server is what the socket buffers took.
    assert host.opt_out_sent < OPT_OUT_BODY_BYTES / 8
    assert fetcher.counts["opt_out_before_body"] == 1


@pytest.mark.timeout(120)
def test_a_shard_obeys_robots_txt_and_says_why(tmp_path, redis_url, world, truth):
    with TestHost(world / "web", robots="User-agent: *\nDisallow: /img/0000\n") as host:
        urls = image_urls(host, truth, 20)
        rows, stats = run_shard(tmp_path, redis_url, urls)
    disallowed = [u for u in urls if "/img/0000" in u]
    assert disallowed and len(host.robots_requests) == 1
    assert host.stats[200] == 20 - len(disallowed)  # the disallowed ones were never requested
    for row in rows:
        if row["url"] in disallowed:
            assert row["status"] == "failed_to_download" and "disallowed by robots.txt" in row["error_message"]
        else:
            assert row["status"] == "success"
    assert stats["refused"] == {"robots.txt": len(disallowed)}
    assert stats["politeness"]["robots_fetches"] == 1


@pytest.mark.timeout(120)
def test_ignore_robots_txt_is_said_loudly(tmp_path, redis_url, world, truth, caplog):
    with TestHost(world / "web", robots="User-agent: *\nDisallow: /\n") as host:
        with caplog.at_level("WARNING", logger="clipfleet.download"):
            rows, _ = run_shard(tmp_path, redis_url, image_urls(host, truth, 5), ignore_robots_txt=True)
    assert [r["status"] for r in rows] == ["success"] * 5 and host.robots_requests == []
    assert any("robots.txt is IGNORED" in r.getMessage() for r in caplog.records)
