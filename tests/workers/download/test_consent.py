"""Opt-outs of 2026 for the "train-ai" purpose: aipref Content-Usage, TDMRep, Content-Signal,
a do-not-train list, --respect and --contact (workers/download/consent.py and neighbours)."""
from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import redis

from clipfleet.sandbox.consent import CASES
from clipfleet.sandbox.hosts import OPT_OUT_BODY_BYTES, TestHost
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from clipfleet.workers.download.consent import parse_respect, signal_refusal, usage_refusal
from clipfleet.workers.download.donottrain import DoNotTrain
from clipfleet.workers.download.fetch import FetchFailed, Fetcher, user_agent
from clipfleet.workers.download.options import DownloadOptions
from clipfleet.workers.download.politeness import DomainLimiter, DomainLimits
from clipfleet.workers.download.robots_prefs import RobotsPrefs
from clipfleet.workers.download.tdmrep import TdmRules
from clipfleet.shared.pipeline import execute
from tests.workers.download.conftest import make_stage, url_table, write_url_shard
from tests.workers.download.test_polite_hosts import run_shard

IMAGES_PER_HOST = 6


# -- the parsers, on each specification's own examples

# draft-ietf-aipref-attach, "Example robots.txt file" (with the vocabulary's train-ai).
ATTACH_EXAMPLE = """User-Agent: *
Allow: /
Disallow: /never/
Content-Usage: train-ai=n
Content-Usage: /ai-ok/ train-ai=y

User-Agent: ExampleBot
Allow: /
Content-Usage: train-ai=y
"""


@pytest.mark.parametrize("path, token, refused", [
    ("/test", "clipfleet", True), ("/ai-ok/test", "clipfleet", False),  # longest path wins
    ("/test", "examplebot", False), ("/ai-ok/test", "ExampleBot", False),  # its own group, not *
])
def test_content_usage_in_robots_txt_follows_the_attach_drafts_example(path, token, refused):
    said = RobotsPrefs(ATTACH_EXAMPLE).refusal("http://h.example" + path, [token], "train-ai", True, True)
    assert (said is not None) is refused
    if refused:
        assert said[0] == "content-usage robots.txt" and "train-ai=n" in said[1]


def test_content_usage_rules_of_equal_length_combine_to_the_most_restrictive():
    text = "User-agent: *\nContent-Usage: /a/ train-ai=y\nContent-Usage: /a/ train-ai=n\n"
    assert RobotsPrefs(text).refusal("http://h/a/x.jpg", ["clipfleet"], "train-ai", True, True)
    # and a rule for a path does not reach other paths
    assert RobotsPrefs(text).refusal("http://h/b/x.jpg", ["clipfleet"], "train-ai", True, True) is None


@pytest.mark.parametrize("value, refusal", [
    ("train-ai=n", "train-ai=n"), ("train-ai=y", None), ("train-ai=n, search=y", "train-ai=n"),
    ("search=n", None), ("bots=n", "bots=n"),          # an earlier draft's parent category
    ("bots=n, train-ai=y", None),                      # the more specific one decides
    ("train-ai=y, train-genai=n", "train-genai=n"),    # generative training reserved: refused
    ("TRAIN-AI=n", None),                              # keys are lower case (RFC 8941): not our key
    ("train-ai=n,,", None), ("train-ai=\"n\"", None),  # not a dictionary / not a token: no preference
    ("train-ai", None), ("", None),
])
def test_content_usage_vocabulary(value, refusal):
    assert usage_refusal(value) == refusal


@pytest.mark.parametrize("value, refused", [
    ("search=yes, ai-train=no", True), ("ai-train=no", True), ("search=yes, ai-train=yes", False),
    ("ai-input=no", False), ("ai-train=no;;", False),
])
def test_content_signal_vocabulary(value, refused):
    assert (signal_refusal(value) is not None) is refused


# TDMRep's tdmrep.json examples: one rule for a whole site; per-location rules, first match deciding.
@pytest.mark.parametrize("rules, path, refused", [
    ([{"location": "/", "tdm-reservation": 1, "tdm-policy": "https://provider.com/policies/policy.json"}],
     "/any/thing.jpg", True),
    ([{"location": "/images/*", "tdm-reservation": 1}, {"location": "/*", "tdm-reservation": 0}],
     "/images/a.jpg", True),
    ([{"location": "/images/*", "tdm-reservation": 1}, {"location": "/*", "tdm-reservation": 0}],
     "/text/a.html", False),
    ([{"location": "/img/*", "tdm-reservation": 0}, {"location": "/", "tdm-reservation": 1}], "/img/a.jpg", False),
    ([{"location": "/*.jpg$", "tdm-reservation": 1}], "/a.jpg", True),
    ([{"location": "/*.jpg$", "tdm-reservation": 1}], "/a.jpg.png", False),
    ([{"location": "/", "tdm-reservation": "maybe"}], "/a.jpg", False),  # no valid value: says nothing
])
def test_tdmrep_json_rules(rules, path, refused):
    assert (TdmRules(json.dumps(rules)).refusal("http://h.example" + path) is not None) is refused


@pytest.mark.parametrize("text", ["", "not json", "{\"location\": \"/\"}", "[1, \"x\", null]"])
def test_a_tdmrep_json_of_junk_reserves_nothing_and_does_not_crash(text):
    assert TdmRules(text).refusal("http://h/a.jpg") is None


def test_respect_lists_conventions_and_one_usage_category():
    honoured, purpose = parse_respect(["all", "train-ai"])
    assert "tdmrep" in honoured and "content-signal" in honoured and purpose == "train-ai"
    assert parse_respect(["robots.txt"]) == (frozenset({"robots.txt"}), "train-ai")
    with pytest.raises(ValueError, match="--respect: 'tdm'"):
        DownloadOptions(respect=["tdm"])


def test_do_not_train_list_entries_and_errors():
    listed = DoNotTrain.parse(["# exported", "artist.example", "https://gallery.example/private/", ""])
    assert listed.listed("https://cdn.artist.example/a.jpg") and listed.listed("http://artist.example/")
    assert not listed.listed("https://notartist.example/a.jpg")
    assert listed.listed("http://gallery.example/private/b.jpg") and not listed.listed("http://gallery.example/b.jpg")
    with pytest.raises(ValueError, match="list:2: not a domain or URL prefix"):
        DoNotTrain.parse(["ok.example", "not a domain"], source="list")


def test_the_user_agent_carries_the_contact():
    ua = user_agent("mycrawl", contact="mailto:ops@crawl.example")
    assert "+mailto:ops@crawl.example" in ua and ua.endswith("; mycrawl)")
    with pytest.raises(ValueError, match="contact must be printable"):
        Fetcher(DownloadOptions(contact="x\r\nEvil: 1"))


# -- hosts on loopback

@pytest.mark.timeout(300)
def test_sandbox_hosts_for_each_convention(tmp_path, redis_url, world, truth):
    """None of a reserving host's images stored, all of a granting or silent host's, each refusal
    counted under its kind and its convention; URLs of hosts whose site-wide file reserves them
    are never requested."""
    paths = [urlsplit(u).path for u in truth.column("url").to_pylist()][:IMAGES_PER_HOST]
    hosts = [case.start(world / "web") for case in CASES]
    try:
        urls, owner = [], {}
        for case, host in zip(CASES, hosts):
            for path in paths:
                urls.append(host.url + path)
                owner[host.url + path] = case
        rows, stats = run_shard(tmp_path, redis_url, urls)
    finally:
        for host in hosts:
            host.stop()
    for row in rows:
        case = owner[row["url"]]
        if case.reserves:
            assert row["status"] == "failed_to_download", (case.name, row["error_message"])
        else:
            assert row["status"] == "success", (case.name, row["error_message"])
    expected_kinds = {case.kind: IMAGES_PER_HOST for case in CASES if case.reserves}
    assert stats["refused"] == expected_kinds
    conventions = {}
    for case in CASES:
        if case.reserves:
            conventions[case.convention] = conventions.get(case.convention, 0) + IMAGES_PER_HOST
    assert stats["consent"] == conventions
    for case, host in zip(CASES, hosts):
        # each site-wide file asked once (tdmrep.json not at all when robots.txt already refused)
        assert len(host.robots_requests) == 1, case.name
        assert len(host.tdmrep_requests) == (0 if case.where == "robots.txt rule" and case.reserves else 1)
        if case.reserves and case.where != "header":
            assert host.stats[200] == 0, case.name  # refused before any request for an image


@pytest.mark.parametrize("headers", [{"Content-Usage": "train-ai=n"},
                                     {"tdm-reservation": "1", "tdm-policy": "https://rights.example/p.json"}])
def test_a_header_reservation_stops_the_read_when_the_headers_arrive(headers):
    with TestHost(image=b"unused", opt_out_headers=headers) as host:
        fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_timeout=30))
        with pytest.raises(FetchFailed, match="reserved by") as failed:
            fetcher.fetch(host.url + "/opt-out/a.jpg")
    assert failed.value.refused in ("content-usage header", "tdmrep header")
    assert host.opt_out_sent < OPT_OUT_BODY_BYTES / 8  # what the socket buffers took, not the body
    assert fetcher.counts["opt_out_before_body"] == 1


def _worker(redis_url: str, **options) -> Fetcher:
    opts = DownloadOptions(**{"allow_private_addresses": True, "download_timeout": 2.0, **options})
    return Fetcher(opts, DomainLimiter(redis.Redis.from_url(redis_url), DomainLimits()))


def test_tdmrep_json_is_fetched_once_for_the_fleet(redis_url, world):
    rules = json.dumps([{"location": "/private/", "tdm-reservation": 1}])
    with TestHost(image=b"img", tdmrep=rules) as host:
        first, second = _worker(redis_url), _worker(redis_url)  # two machines on one Redis
        assert first.fetch(host.url + "/a.jpg") == b"img"
        assert second.fetch(host.url + "/b.jpg") == b"img"
        with pytest.raises(FetchFailed, match="tdmrep.json") as failed:
            second.fetch(host.url + "/private/c.jpg")
    assert failed.value.refused == "tdmrep.json"
    assert len(host.tdmrep_requests) == 1
    assert redis.Redis.from_url(redis_url).ttl(f"clipfleet:tdmrep:http://127.0.0.1:{urlsplit(host.url).port}") > 0


@pytest.mark.parametrize("status, expected", [(404, "fetched"), (403, "fetched"),
                                              (500, "tdmrep.json unreachable"), (503, "tdmrep.json unreachable")])
def test_tdmrep_json_errors_are_read_as_rfc_9309_reads_robots_txt_errors(status, expected):
    with TestHost(image=b"img", tdmrep_status=status) as host:
        fetcher = Fetcher(DownloadOptions(allow_private_addresses=True, download_timeout=2.0, download_retries=0))
        try:
            fetcher.fetch(host.url + "/a.jpg")
            got = "fetched"
        except FetchFailed as exc:
            got = exc.refused or str(exc)
    assert got == expected


@pytest.mark.timeout(120)
def test_respect_turns_a_convention_off_loudly_once_and_says_so_in_run_json(tmp_path, redis_url, world, truth,
                                                                          caplog):
    case = next(c for c in CASES if c.name == "content-usage-header-n")
    paths = [urlsplit(u).path for u in truth.column("url").to_pylist()][:4]
    respect = ["robots.txt", "x-robots-tag", "tdmrep", "content-signal", "page-meta", "do-not-train", "train-ai"]
    with case.start(world / "web") as host, caplog.at_level("WARNING", logger="clipfleet.download"):
        rows, stats = run_shard(tmp_path, redis_url, [host.url + p for p in paths], respect=respect)
        # another worker of the same run, on another shard: the run was told already
        store = Store(str(tmp_path / "store"))
        write_url_shard(store, 1, url_table([host.url + p for p in paths]))
        execute(make_stage(RunConfig.load(store), redis_url), store, 1)
    assert [r["status"] for r in rows] == ["success"] * 4 and "consent" not in stats
    assert host.stats[200] == 8
    warnings = [r.getMessage() for r in caplog.records if "NOT honoured" in r.getMessage()]
    assert len(warnings) == 1 and "content-usage" in warnings[0]
    saved = RunConfig.load(store)
    assert saved.download.not_honoured == ["content-usage"]
    assert Store(str(tmp_path / "store")).read_json("run.json")["download"]["not_honoured"] == ["content-usage"]


@pytest.mark.timeout(120)
def test_a_do_not_train_list_is_applied_before_any_request(tmp_path, redis_url, world, truth):
    paths = [urlsplit(u).path for u in truth.column("url").to_pylist()][:4]
    with TestHost(world / "web") as listed, TestHost(world / "web") as other:
        registry = tmp_path / "do-not-train.txt"
        registry.write_text(f"# exported from an opt-out registry\n{listed.url}/img/\n")
        urls = [listed.url + p for p in paths] + [other.url + p for p in paths]
        rows, stats = run_shard(tmp_path, redis_url, urls, do_not_train=str(registry))
    assert [r["status"] for r in rows] == ["failed_to_download"] * 4 + ["success"] * 4
    assert listed.stats[200] == 0 and listed.robots_requests == []  # not even its robots.txt
    assert stats["refused"] == {"do-not-train": 4} and stats["consent"] == {"do-not-train": 4}
