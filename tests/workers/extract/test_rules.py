"""The extraction rules as plain functions: alt text, URLs, record structure; and fuzzed
records and links, where every link is counted once, as a pair or under a drop reason."""
from __future__ import annotations

import gzip
import itertools
import json
import random
import sys
from collections import Counter
from urllib.parse import urljoin, urlparse

import pytest

from clipfleet.shared.runconfig import RunConfig
from clipfleet.workers.extract.rules import (PageUrls, clean_alt, extract_pairs, image_pairs, join_base, page_links,
                                             url_drop_reason)
from clipfleet.workers.extract.wat import gzip_tail_truncated, open_wat
from tests.workers.extract.watfile import good_page, img, response_record, write_wat

CFG = RunConfig.make(store="unused").extract
PAGE = "http://example.org/gallery/page.html"
# every rule at a different setting, and extensions the ASCII fast paths could not take
ODD_CFG = RunConfig.make(store="unused", min_alt_length=1, max_alt_length=12, max_url_length=40,
                         drop_extensions=(".JPG", "1.webp", ".ſvg")).extract
EMPTY_EXTENSION_CFG = RunConfig.make(store="unused", drop_extensions=("",)).extract
NO_EXTENSION_CFG = RunConfig.make(store="unused", drop_extensions=()).extract


def read_all(path, cfg=CFG) -> tuple[list, Counter]:
    stats = Counter()
    with open_wat(str(path)) as source:
        return list(extract_pairs(source, cfg, stats)), stats


def assert_every_link_counted(pairs: list, stats: Counter) -> None:
    """Each IMG@/src link became a pair or was dropped under one reason, never both, never lost."""
    dropped = sum(n for reason, n in stats.items() if reason.startswith("drop_"))
    assert stats["img_links"] == len(pairs) + dropped, stats
    assert all(url.lower().startswith(("http://", "https://")) and caption for url, caption, _ in pairs)


@pytest.mark.parametrize("alt, caption", [
    ("a red circle", "a red circle"),
    ("\n  a \x07red\x1b  circle \t\t on\r\n white  ", "a red circle on white"),
    ("a\x00b\x7fc\x9fd e", "abcd e"),
    ("non\xa0breaking\u3000spaces", "non breaking spaces"),
    ("", ""),
])
def test_alt_text_is_cleaned(alt, caption):
    assert clean_alt(alt) == caption


def test_alt_text_is_cut_at_the_maximum():
    stats = Counter()
    assert image_pairs([img("/a.jpg", "word " * 1000)], PAGE, CFG, stats) == \
        [("http://example.org/a.jpg", ("word " * 400)[:2000])]
    assert stats["alt_truncated"] == 1


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
    assert PageUrls(base).resolve(src) == url


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


def test_gzip_tail_check():
    members = b"".join(gzip.compress(f"record {i} ".encode() * 50) for i in range(5))
    assert not gzip_tail_truncated(members)
    assert gzip_tail_truncated(members[:-5])
    assert gzip_tail_truncated(members[: len(members) // 2 + 7])
    assert gzip_tail_truncated(members + b"\x1f\x8b")


def test_fast_resolution_equals_urljoin():
    """PageUrls takes shortcuts; on every relative form it must give urljoin's answer."""
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


def test_page_urls_parse_bases_as_urlparse_does():
    rng = random.Random(1)
    pieces = ["http://", "HTTPS://", "h.org", "user@h:81", "/", "a", ";p", "?q", "#f", "[::1]", "[", "]",
              "\t", " ", "..", ".", "//", "é", "ftp:", ":", "\uff0f"]
    for _ in range(20000):
        base = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 7)))
        try:
            parts = urlparse(base)
        except ValueError:
            continue
        page = PageUrls(base)
        directory = parts.path.split("/")
        if directory[-1] != "":
            del directory[-1]
        assert (page.scheme, page.prefix, page.directory) == \
            (parts.scheme, f"{parts.scheme}://{parts.netloc}", directory), base


def test_join_base_is_urljoin():
    rng = random.Random(2)
    pieces = ["http://", "https://", "HTTP://", "h.org", "/", "a", ";p", "?", "?q", "#", "#f", "[::1]", "[",
              " ", "\t", "..", "é", ":", "//"]
    for _ in range(20000):
        page = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        base = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5))).strip()
        outcomes = []
        for join in (urljoin, join_base):
            try:
                outcomes.append(join(page, base))
            except ValueError:
                outcomes.append(ValueError)
        assert outcomes[0] == outcomes[1], (page, base)


def test_a_base_urlparse_rejects_drops_relative_links_only():
    stats = Counter()
    pairs = image_pairs([img("/a.jpg", "a good caption"), img("http://x.org/b.jpg", "a good caption")],
                                "http://[bad/page.html", CFG, stats)
    assert pairs == [("http://x.org/b.jpg", "a good caption")] and stats["drop_bad_url"] == 1


# -- fuzzing: random links and bases, broken and damaged records

SRCS = ["http://cdn.example.org/a.jpg", "HTTPS://cdn.example.org/A.JPG", "/img/a.jpg", "/img/./a.jpg",
        "/a/../b.jpg", "//cdn.example.org/a.jpg", "///x.jpg", "//", "/", "a.jpg", "img/a.jpg", "./a.jpg",
        "../a.jpg", "../../../../a.jpg", "..//a.jpg", "../.", "a//b.jpg", "a/./b.jpg", "a/..", "..", ".",
        "?q=1", "#f", "http://[x/a.svg", "http://[::1]/a.svg", "http:///a.svg", "https://h.org", "http://h.org/.svg",
        "HTTP://h.org/b.GIF", "http://h.org/a.svg/", "http://u@h.org:8/c.gif", "http://h.org/\x01.svg",
        "/a.jpg?", "/a.jpg#", "/a.jpg?x=1#y", "a.jpg;p=1", "ftp://example.org/a.jpg", "mailto:x@y.org",
        "HTTP:a.jpg", "https:a.jpg", "c:d.jpg", "a/b:c.jpg", "ftp://[::1/a.jpg", "//[::1]/a.jpg",
        "  /padded.jpg\t", "\n", "data:image/png;base64,AAAA", "DATA:x", "JavaScript:void(0)",
        "javaſcript:x", "/logo.svg", "/logo.SVG?v=2", "/a.svg/b.jpg", "/a.jpg?x=.svg", "/a.sv\tg",
        "http://h.svg", "http://example.org/a.gif#top", "/img/á.jpg", "/\u212a.svg", "/a b.jpg",
        "/a.webp", "/x1.webp", "/café.jpg", "/" + "x" * 60 + ".jpg", "http://example.org/" + "y" * 40,
        "/a.ſvg", "/A.JPG", "\x01a.jpg", "a\x7f.jpg", "ÿ.jpg", None, 7]
ALTS = ["a good caption", "  padded  caption ", "tab\there", "new\nline", "a\x00b\x07c d", "nbsp\xa0here",
        "ideo\u3000space", "line\u2028sep", "ogham\u1680space", "nel\x85here", "\x1c\x1d\x1e\x1fsep",
        "縞模様の背景に赤い丸、です", "日本語のテキスト", "ab", "  ab  ", "", "   ", "«guillemets»",
        "zero\u200bwidth", "x" * 20, "ÉCRITURE EN MAJUSCULES", "😀 emoji caption", None, 3]
BASES = ["http://example.org/gallery/page.html", "https://example.org/", "http://example.org",
         "http://example.org/..//x", "http://example.org/a/./b/../c/",
         "http://user@example.org:81/a/b;p/c?x=1#y", "http://example.org/a//b/./c/../d/",
         "HTTP://Example.ORG/A/B", "http://[::1]/a/", "http://exämple.org/a/", "ftp://example.org/a/",
         "http:///nohost/a", "http://example.org/a b/c"]


def links_of(rng: random.Random, n: int) -> list:
    links = []
    for _ in range(n):
        link = {"path": rng.choice(["IMG@/src", "IMG@/src", "IMG@/src", "A@/href", "IMG@/data-src"])}
        src, alt = rng.choice(SRCS), rng.choice(ALTS)
        if src is not None:
            link["url"] = src
        if alt is not None:
            link["alt"] = alt
        links.append(link)
    return links


def random_pages(seed: int, n: int) -> list[bytes]:
    """Records with random links, written with escapes or as raw UTF-8 by turns."""
    rng = random.Random(seed)
    pages = []
    for i in range(n):
        base = rng.choice(BASES)
        head_base = rng.choice([None, None, "/static/", "../up/", "http://other.org/x/", " ", "//cdn.org/"])
        page = response_record(base if head_base is None else f"http://example.org/p{i}.html",
                               links_of(rng, rng.randint(0, 12)), base=head_base)
        pages.append(json.dumps(page, ensure_ascii=bool(i % 2)).encode())
    return pages


def broken_records() -> list:
    """Records pyarrow might read otherwise than json.loads, each between good ones."""
    good = good_page(0)
    text = json.dumps(good)
    deep = '{"x": ' + "[" * 3000 + "]" * 3000 + ", " + text[1:]
    return [
        text.replace('"Links"', '"Links": null, "L"'),               # a key null, then present
        text.replace('"WARC-Target-URI": "http://example.org/gallery/0/page.html"', '"WARC-Target-URI": null'),
        json.dumps({"Envelope": {**good["Envelope"], "Payload-Metadata": None}}),
        json.dumps({"Envelope": {"WARC-Header-Metadata": good["Envelope"]["WARC-Header-Metadata"]}}),
        text.replace('"Links": [', '"Links": [null, '),
        text.replace('"Head": {', '"Head": null, "H": {'),
        text.replace('"alt": "picture number 0"', '"alt": null'),
        text.replace('"url": "/img/0.jpg"', '"url": 5'),
        text.replace('"Links": [', '"Links": [5, '),
        text.replace('"Title": "a page"', '"Title": "a page", "Base": 1'),
        text.replace('"Head": {', '"Head": "x", "H": {'),
        text.replace('"WARC-Target-URI"', '"WARC-Target-URI": "http://dup.org/", "WARC-Target-URI"'),
        text.replace('"alt": "picture number 0"', '"alt": "first", "alt": "picture number 0"'),
        text.replace('"picture number 0"', '"lone \\ud800 surrogate"'),
        text.replace('"picture number 0"', '"pair \\ud83d\\ude00 of them"'),
        text.replace('"Title": "a page"', '"Title": "bad \\u00ff", "T": "\xff"').encode("latin-1"),
        text.replace('"Title": "a page"', '"Title": "bad \xed\xa0\x80"').encode("latin-1"),
        text.replace('"Title": "a page"', '"Title": NaN, "t": Infinity, "u": 1e999, "v": 123456789012345678901234567890'),
        deep,
        "\ufeff" + text,
        " \ufeff" + text,
        text.replace(", ", ",\n "),
        text.replace('"a page"', '"a\npage"'),
        text.replace('"a page"', '"a\rpage"'),
        "null" + text,                                              # pyarrow 20 crashes on this one
        " null " + text,
        text + " " + text,
        text + " x",
        text[:len(text) // 2],
        "[" + text + "]",
        '"IMG@"',
        text.replace('"Title": "a page"', '"Title": "a\x01page"'),
        "\x0c" + text,
        text.encode("utf-16"),
    ]


@pytest.mark.parametrize("cfg", [CFG, ODD_CFG, EMPTY_EXTENSION_CFG, NO_EXTENSION_CFG])
def test_random_links_and_bases(tmp_path, cfg):
    path = tmp_path / "random.wat.gz"
    write_wat(path, random_pages(seed=7, n=600))
    pairs, stats = read_all(path, cfg)
    assert_every_link_counted(pairs, stats)
    assert len(pairs) > 100 or "" in cfg.drop_extensions  # "" ends every URL: all dropped
    assert all(len(caption) <= cfg.max_alt_length and len(url) <= cfg.max_url_length for url, caption, _ in pairs)


def test_broken_records_between_good_ones(tmp_path):
    """Every kind of broken record is skipped or read, and the good pages around it all come through."""
    payloads: list = []
    for i, record in enumerate(broken_records()):  # broken copies of page 0; the good ones are 1, 2, ...
        record = record if isinstance(record, bytes) else record.encode()
        payloads += [record, good_page(2 * i + 1), record, good_page(2 * i + 2)]
    path = tmp_path / "broken.wat.gz"
    write_wat(path, payloads)
    pairs, stats = read_all(path)
    assert_every_link_counted(pairs, stats)
    good = [pair for i in range(1, 2 * len(broken_records()) + 1) for pair in [
        (f"http://example.org/img/{i}.jpg", f"picture number {i}", f"http://example.org/gallery/{i}/page.html"),
        (f"http://example.org/gallery/b/{i}.png", f"other picture {i}", f"http://example.org/gallery/{i}/page.html")]]
    assert [pair for pair in pairs if pair[2] != "http://example.org/gallery/0/page.html"
            and pair[2] != "http://dup.org/"] == good
    assert stats["records"] == 4 * len(broken_records())
    assert (stats["malformed_json"], stats["non_utf8_record"], stats["malformed_record"]) == (20, 2, 8)


def test_byte_mutations(tmp_path):
    """Random damage to good records, many to a batch: every outcome the same either way."""
    rng = random.Random(3)
    pieces = [b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"\n", b"\xff", b"\xc3", b"null", b"\x00",
              b"IMG@/src", b'"alt"', b"\\u00e9", b"\\ud800", b" ", b"1e999", b"NaN"]
    payloads = []
    for i in range(400):
        body = bytearray(random_pages(seed=i, n=1)[0])
        for _ in range(rng.choice([0, 1, 1, 2, 5])):
            at = rng.randrange(len(body))
            action = rng.random()
            if action < 0.4:
                body[at:at] = rng.choice(pieces)
            elif action < 0.7:
                del body[at:at + rng.randint(1, 8)]
            else:
                body[at:at + 1] = rng.choice(pieces)
        payloads.append(bytes(body) if b"IMG@" in body else bytes(body) + b" IMG@")
    path = tmp_path / "mutated.wat.gz"
    write_wat(path, payloads)
    assert_every_link_counted(*read_all(path))


def test_deep_records_are_malformed_json(tmp_path):
    depth = sys.getrecursionlimit() + 10
    deep = '{"x": ' + "[" * depth + "]" * depth + ", " + json.dumps(good_page(1))[1:]
    path = tmp_path / "deep.wat.gz"
    write_wat(path, [good_page(0), deep.encode(), good_page(2)])
    pairs, stats = read_all(path)
    assert stats["malformed_json"] == 1
    assert [page for _, _, page in pairs] == ["http://example.org/gallery/0/page.html"] * 2 + \
        ["http://example.org/gallery/2/page.html"] * 2


@pytest.mark.parametrize("url", [
    "http://example.org/a.gif", "http://example.org/a.gif?x=1", "http://example.org/a.jpg?f=b.gif",
    "http://example.org/a.jpg#b.gif", "http://example.org/a.gif#x?y", "http://example.org/x#a?b.gif",
    "http://host.gif", "http://host.gif?x=1", "http://host.gif#frag", "https://h/?q=.gif",
    "http://user:pw@host/a.GIF", "http://h/a.gif;p=1", "http://[::1]/a.gif", "http://[::1/a.gif",
    "http://h/a\t.gif", "http://h/a.g\nif", "http://h/\u00e9.gif", "http://h/a.gif\x0b",
    "HTTP://H/A.GIF?", "http://h//a.gif", "http://h/a.gif/", "https://h:8080/b/c.svg?x#y",
])
def test_the_path_s_extension_is_the_one_urlsplit_finds(url):
    from urllib.parse import urlsplit

    from clipfleet.workers.extract.rules import _path_ends_with
    try:
        expected = urlsplit(url).path.lower().endswith((".gif", ".svg"))
    except ValueError:
        with pytest.raises(ValueError):
            _path_ends_with(url, (".gif", ".svg"))
        return
    assert _path_ends_with(url, (".gif", ".svg")) == expected


@pytest.mark.parametrize("alt", ["a b", " a", "a ", "a  b", "", " ", "a\u2003b", "a\u00a0 b", "\tx",
                                 "x\x1fy", "a b c d"])
def test_clean_alt_is_whitespace_folded_with_controls_removed(alt):
    import re
    assert clean_alt(alt) == " ".join(re.sub("[\x00-\x08\x0e-\x1f\x7f-\x9f]", "", alt).split())
