"""The columnar path (pyarrow parse, rules as arrays) against the one-record path it replaces:
the same pairs, in the same order, with the same counts, on every kind of record and link."""
from __future__ import annotations

import json
import random
import sys
from collections import Counter
from urllib.parse import urljoin, urlparse

import pyarrow as pa
import pytest
import redis

from clipfleet.shared.pipeline import TransientError
from clipfleet.shared.runconfig import RunConfig
from clipfleet.workers.extract import stage as extract
from clipfleet.shared.ids import pair_uid, pair_uids
from clipfleet.shared.language import LanguageTagger, language_text
from clipfleet.workers.extract.stage import (ExtractStage, PageUrls, clean_alt, extract_pairs, join_base, open_wat,
                                             page_pairs, url_digest, url_digests)
from tests.helpers import run_direct
from tests.workers.extract.watfile import img, response_record, write_wat

CFG = RunConfig.make(store="unused").extract
# every rule at a different setting, and extensions the ASCII tests cannot take
ODD_CFG = RunConfig.make(store="unused", min_alt_length=1, max_alt_length=12, max_url_length=40,
                    drop_extensions=(".JPG", "1.webp", ".ſvg")).extract
EMPTY_EXTENSION_CFG = RunConfig.make(store="unused", drop_extensions=("",)).extract
NO_EXTENSION_CFG = RunConfig.make(store="unused", drop_extensions=()).extract


def both_paths(path, cfg: RunConfig) -> tuple[list, Counter, list, Counter]:
    one_stats, columnar_stats = Counter(), Counter()
    with open_wat(str(path)) as source:
        one = [(url, caption, page) for page, pairs in page_pairs(source, cfg, one_stats) for url, caption in pairs]
    with open_wat(str(path)) as source:
        columnar = list(extract_pairs(source, cfg, columnar_stats))
    return one, one_stats, columnar, columnar_stats


def assert_same(path, cfg=CFG) -> list:
    one, one_stats, columnar, columnar_stats = both_paths(path, cfg)
    assert columnar == one
    assert +columnar_stats == +one_stats and set(columnar_stats) == set(one_stats)
    return one


def good_page(i: int) -> dict:
    return response_record(f"http://example.org/gallery/{i}/page.html",
                           [img(f"/img/{i}.jpg", f"picture number {i}"), img(f"../b/{i}.png", f"other picture {i}")])


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


@pytest.mark.parametrize("cfg", [CFG, ODD_CFG, EMPTY_EXTENSION_CFG, NO_EXTENSION_CFG])
def test_random_links_and_bases(tmp_path, cfg):
    path = tmp_path / "random.wat.gz"
    write_wat(path, random_pages(seed=7, n=600))
    pairs = assert_same(path, cfg)
    assert len(pairs) > 100 or "" in cfg.drop_extensions  # "" ends every URL: all dropped


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


@pytest.mark.parametrize("cfg, batch", [(CFG, 2000), (ODD_CFG, 2000), (CFG, 2), (CFG, 1)])
def test_records_pyarrow_could_read_otherwise(tmp_path, monkeypatch, cfg, batch):
    monkeypatch.setattr(extract, "RECORDS_PER_BATCH", batch)  # each broken record first in a batch, too
    payloads: list = []
    for i, record in enumerate(broken_records()):
        record = record if isinstance(record, bytes) else record.encode()
        payloads += [record, good_page(2 * i), record, good_page(2 * i + 1)]
    path = tmp_path / "broken.wat.gz"
    write_wat(path, payloads)
    one = assert_same(path, cfg)
    assert len(one) > 2 * len(broken_records())


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
    assert_same(path, CFG)


def test_sandbox_wats_take_the_columnar_path(sandbox, monkeypatch):
    """The sandbox's good records are parsed by pyarrow, not one by one; the broken few are not."""
    one_record = []
    original = extract._record_pairs
    monkeypatch.setattr(extract, "_record_pairs", lambda body, *args: (one_record.append(body), original(body, *args)))
    for wat in sandbox.wats:
        assert_same(wat)
    assert 0 < len(one_record) <= 2 * 4 * len(sandbox.wats)  # both runs, at most the 4 bad records a WAT


def test_deep_records_are_malformed_json_either_way(tmp_path):
    depth = sys.getrecursionlimit() + 10
    deep = '{"x": ' + "[" * depth + "]" * depth + ", " + json.dumps(good_page(1))[1:]
    path = tmp_path / "deep.wat.gz"
    write_wat(path, [good_page(0), deep.encode(), good_page(2)])
    one, stats, _, _ = both_paths(path, CFG)
    assert stats["malformed_json"] == 1
    assert_same(path)


def test_byte_tests_cover_every_character_clean_alt_changes():
    """_MAY_NEED_CLEANING must flag each character that clean_alt removes or splits on."""
    changed = [chr(c) for c in range(0x110000)
               if not 0xd800 <= c < 0xe000 and (chr(c).isspace() and c != 0x20 or clean_alt(f"a{chr(c)}b") != f"a{chr(c)}b")]
    flagged = extract._has_bytes(pa.array([f"a{c}b" for c in changed]), extract._MAY_NEED_CLEANING)
    assert changed and flagged.all()


def test_has_bytes_on_slices_nulls_and_empty_strings():
    strings = pa.array(["ab", None, "", "x?y", "é#", "", "  x", "z"]).slice(1)
    assert extract._has_bytes(strings, [extract._run("?")]).tolist() == [False, False, True, False, False, False, False]
    assert extract._has_bytes(strings, [((0x80, 0xff),)]).tolist() == [False, False, False, True, False, False, False]
    assert extract._has_bytes(strings, [extract._run("  ")]).tolist() == [False, False, False, False, False, True, False]
    assert extract._has_bytes(pa.array([], pa.string()), [extract._run("a")]).tolist() == []
    assert extract._has_bytes(pa.array(["a", ""]), [((0, 0xff),)]).tolist() == [True, False]


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


def test_language_text_shortcut_keeps_its_meaning():
    """Letters and spaces skip the regex; every other character must still go through it."""
    import re
    not_letters = re.compile(r"[\W\d_]+")
    for code in range(0x110000):
        if not 0xd800 <= code < 0xe000:
            caption = f"Ab {chr(code)}c"
            assert language_text(caption) == " ".join(not_letters.sub(" ", caption).split()).lower(), hex(code)


def test_a_base_urlparse_rejects_drops_relative_links_only():
    stats = Counter()
    pairs = extract.image_pairs([img("/a.jpg", "a good caption"), img("http://x.org/b.jpg", "a good caption")],
                                "http://[bad/page.html", CFG, stats)
    assert pairs == [("http://x.org/b.jpg", "a good caption")] and stats["drop_bad_url"] == 1


def test_language_is_predicted_once_per_text():
    tagger = LanguageTagger(min_score=0.3)
    first = tagger.tag("IMG_0566.JPG")
    assert first == LanguageTagger(0.3, cache=False).tag("IMG_0566.JPG")

    class NoModel:
        def predict(self, text):
            raise AssertionError(f"predicted {text!r} again")

    tagger._model = NoModel()
    assert tagger.tag("IMG_0567.JPG") == first  # another caption, the same text: "img jpg"


def test_batch_digests_and_uids_match_the_single_ones():
    urls = ["http://example.org/a.jpg", "http://example.org/é.jpg", "http://example.org/😀"]
    captions = ["a", "b c", "日本"]
    assert url_digests(pa.array(urls)) == [url_digest(u) for u in urls]
    assert pair_uids(pa.array(urls), pa.array(captions)).to_pylist() == [pair_uid(u, c) for u, c in zip(urls, captions)]


def test_a_failing_claim_is_transient(tmp_path):
    path = tmp_path / "a.wat.gz"
    write_wat(path, [good_page(i) for i in range(20)])
    stage = ExtractStage(RunConfig.make(store=str(tmp_path / "store"), inputs=[str(path)]),
                         redis_client=redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TransientError):
        run_direct(stage, None, 0, out, wat=str(path))


def test_shards_split_across_batches(tmp_path, redis_url, monkeypatch):
    """Small record batches and claim batches, shards cut across them: rows in record order."""
    monkeypatch.setattr(extract, "RECORDS_PER_BATCH", 7)
    monkeypatch.setattr(extract, "CLAIM_BATCH", 5)
    path = tmp_path / "a.wat.gz"
    write_wat(path, [good_page(i) for i in range(60)])
    stage = ExtractStage(RunConfig.make(store=str(tmp_path / "store"), inputs=[str(path)], shard_size=17),
                         redis_client=redis.Redis.from_url(redis_url))
    out = tmp_path / "out"
    out.mkdir()
    result, _ = run_direct(stage, None, 0, out, wat=str(path))
    import pyarrow.parquet as pq
    rows = [r for f in sorted(result.files.values()) for r in pq.read_table(f).to_pylist()]
    assert [len(pq.read_table(f)) for f in sorted(result.files.values())] == [17] * 7 + [1]
    with open_wat(str(path)) as source:
        assert [(r["url"], r["caption"], r["page_url"]) for r in rows] == list(extract_pairs(source, CFG, Counter()))
