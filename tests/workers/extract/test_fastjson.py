"""The lazy parse of a WAT record gives what json.loads gives for the fields the rules read,
and steps aside (None) for everything the standard parse must judge and count."""
from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from clipfleet.workers.extract.fastjson import record_parts
from clipfleet.workers.extract.rules import page_links
from tests.workers.extract.watfile import good_page, img, response_record


def expected(doc: dict) -> tuple:
    html = doc["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
    return doc["Envelope"]["WARC-Header-Metadata"]["WARC-Target-URI"], html["Links"], html.get("Head")


@pytest.mark.parametrize("n", range(5))
def test_same_fields_as_json_loads(n):
    body = json.dumps(good_page(n)).encode()
    assert record_parts(body) == expected(json.loads(body))


def test_head_base_and_unicode_kept():
    doc = response_record("http://example.org/ü/page.html", [img("a.jpg", "café ☕"), img("/b.jpg", "x" * 40)])
    doc["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]["Head"] = {
        "Base": "http://cdn.example.org/", "Metas": [{"name": "robots", "content": "index"}]}
    body = json.dumps(doc, ensure_ascii=False).encode()
    page_url, links, head = record_parts(body)
    assert page_url == "http://example.org/ü/page.html"
    assert links[0]["alt"] == "café ☕" and head["Base"] == "http://cdn.example.org/"
    assert page_links(body, Counter())[1] == "http://cdn.example.org/"


@pytest.mark.parametrize("body", [
    b'{"Envelope": ',                                                  # not JSON
    json.dumps(good_page(1)).encode().replace(b"alt", b"\xff\xfe"),    # not UTF-8
    json.dumps(good_page(1)).replace("page", "p\\ud800ge").encode(),   # a lone surrogate escape
    b'{"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": "http://x/"}, "Payload-Metadata": {}}}',
    b'{"Envelope": {"WARC-Header-Metadata": {"WARC-Target-URI": 7}, "Payload-Metadata": {}}}',
    b'[1, 2]',
    ('{"x": ' + "[" * (sys.getrecursionlimit() // 2) + "]" * (sys.getrecursionlimit() // 2) + "}").encode(),
])
def test_steps_aside_for_what_the_standard_parse_judges(body):
    assert record_parts(body) is None


def test_a_lazy_value_left_alive_does_not_break_the_next_record():
    import simdjson
    from clipfleet.workers.extract import fastjson
    parser = fastjson._parser()
    kept = parser.parse(b'{"a": [1, 2]}')["a"]  # a caller holding on to a lazy value
    body = json.dumps(good_page(2)).encode()
    assert record_parts(body) is None            # this parser is busy: the standard parse answers
    del kept
    assert record_parts(body) == expected(json.loads(body))   # a fresh parser from then on
    assert isinstance(fastjson._parser(), simdjson.Parser)
