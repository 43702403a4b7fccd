"""The extraction rules as plain functions: alt text, URLs, record structure, language."""
from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.ids import pair_uid
from clipfleet.shared.language import LanguageTagger, language_bucket, language_text
from clipfleet.workers.extract.stage import (gzip_tail_truncated, image_pairs, normalise_alt, page_links, resolve_url,
                                             url_drop_reason, url_digest)
from tests.workers.extract.watfile import img, response_record

CFG = RunConfig.make(store="unused").extract
PAGE = "http://example.org/gallery/page.html"


@pytest.mark.parametrize("alt, caption", [
    ("a red circle", "a red circle"),
    ("\n  a \x07red\x1b  circle \t\t on\r\n white  ", "a red circle on white"),
    ("a\x00b\x7fc\x9fd e", "abcd e"),
    ("non\xa0breaking\u3000spaces", "non breaking spaces"),
    ("", ""),
])
def test_alt_text_is_cleaned(alt, caption):
    assert normalise_alt(alt, 2000) == caption


def test_alt_text_is_cut_at_the_maximum():
    assert normalise_alt("word " * 1000, 2000) == ("word " * 400)[:2000]


@pytest.mark.parametrize("src, base, url", [
    ("http://cdn.example.com/a.jpg", PAGE, "http://cdn.example.com/a.jpg"),
    ("HTTPS://cdn.example.com/a.jpg", PAGE, "HTTPS://cdn.example.com/a.jpg"),
    ("/img/a.jpg", PAGE, "http://example.org/img/a.jpg"),
    ("../img/a.jpg", PAGE, "http://example.org/img/a.jpg"),
    ("a.jpg", PAGE, "http://example.org/gallery/a.jpg"),
    ("a.jpg", "http://example.org/img/", "http://example.org/img/a.jpg"),
    ("//cdn.example.com/a.jpg", "https://example.org/", "https://cdn.example.com/a.jpg"),
])
def test_relative_urls_resolve_against_the_base(src, base, url):
    assert resolve_url(src, base) == url


@pytest.mark.parametrize("url, reason", [
    ("http://example.org/a.jpg", None),
    ("https://example.org/a.webp?x=1", None),
    ("ftp://example.org/a.jpg", "not_http"),
    ("http://example.org/logo.svg", "extension"),
    ("http://example.org/icon.SVG?v=2", "extension"),
    ("http://example.org/spinner.GIF#top", "extension"),
    ("http://example.org/a.gif.jpg", None),
    ("http://example.org/gifts/a.jpg", None),
    ("http://example.org/?" + "a" * 2048, "long_url"),
])
def test_url_rules(url, reason):
    assert url_drop_reason(url, 2048, (".svg", ".gif")) == reason


def test_url_length_limit_is_inclusive():
    prefix = "http://example.org/a.jpg?ref="
    assert url_drop_reason(prefix + "a" * (2048 - len(prefix)), 2048, ()) is None
    assert url_drop_reason(prefix + "a" * (2049 - len(prefix)), 2048, ()) == "long_url"


def test_every_dropped_link_is_counted_by_reason():
    links = [
        img("/keep.jpg", "a good caption"),
        img("/no-alt.jpg", None),
        img("/short.jpg", " ab\x07c "),
        img("data:image/png;base64,AAAA", "a good caption"),
        img("JavaScript:void(0)", "a good caption"),
        img("ftp://example.org/a.jpg", "a good caption"),
        img("/logo.svg", "a good caption"),
        img("/anim.gif", "a good caption"),
        img("", "a good caption"),
        {"path": "IMG@/data-src", "url": "/lazy.jpg", "alt": "a good caption"},
        {"path": "A@/href", "url": "/next.html", "text": "next page"},
        img("/long.jpg", "x" * 2500),
    ]
    stats = Counter()
    pairs = list(image_pairs(links, PAGE, CFG, stats))
    assert pairs == [("http://example.org/keep.jpg", "a good caption"),
                     ("http://example.org/long.jpg", "x" * 2000)]
    assert stats == Counter(img_links=10, drop_no_alt=1, drop_short_alt=1, drop_data_uri=1,
                            drop_javascript=1, drop_not_http=1, drop_extension=2, drop_no_url=1,
                            alt_truncated=1)


def test_extensions_are_configurable():
    cfg = RunConfig.make(store="unused", drop_extensions=(".svg",)).extract
    pairs = list(image_pairs([img("/anim.gif", "a moving picture")], PAGE, cfg, Counter()))
    assert pairs == [("http://example.org/anim.gif", "a moving picture")]


def test_page_links_uses_base_then_page_url():
    links = [img("a.jpg", "a caption here")]
    body = json.dumps(response_record(PAGE, links, base="/static/")).encode()
    assert page_links(body, Counter()) == (PAGE, "http://example.org/static/", links)
    body = json.dumps(response_record(PAGE, links)).encode()
    assert page_links(body, Counter()) == (PAGE, PAGE, links)


def _broken_records() -> dict[str, bytes]:
    good = response_record(PAGE, [img("a.jpg", "a caption here")])
    text = json.dumps(good).encode()
    no_envelope = {"envelope": good["Envelope"]}
    no_payload = {"Envelope": {"WARC-Header-Metadata": good["Envelope"]["WARC-Header-Metadata"],
                               **good["Envelope"]["Payload-Metadata"]}}
    no_header = {"Envelope": {"Payload-Metadata": good["Envelope"]["Payload-Metadata"]}}
    return {
        "malformed_json": text[: len(text) * 3 // 4],
        "non_utf8_record": text.replace(b"a caption here", b"a caption \xff\xfe\xc3( here"),
        "malformed_record": json.dumps(no_envelope).encode(),
        "malformed_record ": json.dumps(no_payload).encode(),
        "malformed_record  ": json.dumps(no_header).encode(),
        "not_html": json.dumps({"Envelope": {**good["Envelope"], "Payload-Metadata": {}}}).encode(),
    }


@pytest.mark.parametrize("reason, body", list(_broken_records().items()))
def test_broken_records_are_counted_and_skipped(reason, body):
    stats = Counter()
    assert page_links(body, stats) is None
    assert stats == Counter({reason.strip(): 1})


def test_language_text_keeps_letters_only():
    assert language_text("IMG_0566.JPG 1/125s") == "img jpg s"
    assert language_text("DSC01") == "dsc"
    assert language_text("12345 / 678") == ""
    assert language_text("Un CARRÉ bleu") == "un carré bleu"


@pytest.mark.parametrize("caption, bucket", [
    ("a photo of a red circle on a striped background", "en"),
    ("une photo d'un carré bleu sur un fond rayé", "other"),
    ("ein grüner Stern auf einem gepunkteten Hintergrund", "other"),
    ("красный круг на полосатом фоне", "other"),
    ("縞模様の背景に赤い丸", "other"),
    ("DSC00231.jpg", "none"),
    ("2019_0312_001234", "none"),
])
def test_language_buckets(caption, bucket):
    code, score = LanguageTagger(min_score=0.3).tag(caption)
    assert language_bucket(code) == bucket
    assert 0.0 <= score <= 1.0


def test_no_language_keeps_the_score():
    tagger = LanguageTagger(min_score=1.01)  # nothing reaches it
    code, score = tagger.tag("a photo of a red circle on a striped background")
    assert code == "" and score > 0


def test_digests_are_stable_and_compact():
    assert url_digest("http://example.org/a.jpg") == url_digest("http://example.org/a.jpg")
    assert len(url_digest("http://example.org/a.jpg")) == 8
    assert pair_uid("http://a/b.jpg", "x") != pair_uid("http://a/b.jpg", "y")
    assert len(pair_uid("http://a/b.jpg", "x")) == 32


def test_gzip_tail_check():
    members = b"".join(gzip.compress(f"record {i} ".encode() * 50) for i in range(5))
    assert not gzip_tail_truncated(members)
    assert gzip_tail_truncated(members[:-5])
    assert gzip_tail_truncated(members[: len(members) // 2 + 7])
    assert gzip_tail_truncated(members + b"\x1f\x8b")


def test_fast_resolution_equals_urljoin():
    """PageUrls takes shortcuts; on every relative form it must give urljoin's answer."""
    import itertools
    import random
    from urllib.parse import urljoin
    from clipfleet.workers.extract.stage import PageUrls
    pieces = ["a", "b.jpg", ".", "..", "", "x y", "%20", "?q=1", "#f", "?", "#", ";p", ":", "c:d", "~u"]
    bases = ["http://h.org", "http://h.org/", "https://h.org/dir/page.html", "http://h.org/a/b/",
             "http://user@h.org:81/a/b;p/c?x=1#y", "http://h.org/a//b/c", "HTTP://H.org/a/b"]
    rng = random.Random(5)
    srcs = {"/".join(rng.choice(pieces) for _ in range(rng.randint(1, 5))) for _ in range(4000)}
    srcs |= {"/" + s for s in list(srcs)[:1000]} | {"//cdn.h.org/" + s for s in list(srcs)[:500]}
    srcs |= {"///x", "//", "/", "?only", "#only", "mailto:x@y", "ftp://h/x", "a\tb", "\x01a"}
    for base, src in itertools.product(bases, sorted(srcs)):
        if src[:8].lower().startswith(("http://", "https://")):
            continue
        assert PageUrls(base).resolve(src) == urljoin(base, src), (base, src)
