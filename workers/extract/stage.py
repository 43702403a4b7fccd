"""cpu-extract: one Common Crawl WAT segment -> language-tagged, deduplicated URL shards.

The pipeline for one segment, all streaming:

    WAT bytes -> metadata records -> page URL, <base>, Links -> IMG@/src links with alt
      -> hygiene (alt normalisation, URL resolution and filters) -> dedup (segment, then run)
      -> URL shards of `shard_size` rows, each tagged with fastText lid.176

Output: `urls/{segment * 1000 + part:05d}.parquet` with url, caption, page_url, language,
language_score, uid. `language` is the lid.176 ISO code, or "" when the score is under
`min_language_score` (LAION's "no language" bucket); `language_score` is always there.
`uid` is a hex BLAKE2b of url + "\n" + caption.

Every link that does not become a pair is counted under the reason it was dropped, and
those counts go into the segment's marker. Records without an `IMG@` link are not parsed,
so a broken record is counted only when it could have held a pair. The parsing and hygiene rules are plain
functions, so they are tested without a broker.

The rules are written once, one record and one link at a time (page_links, image_pairs);
a segment goes through them as columns (pyarrow parses a batch of records, the rules run
as array operations), which gives the same pairs and counts several times faster.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import re
import sys
import zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urljoin, urlparse, urlsplit

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
from celery.exceptions import SoftTimeLimitExceeded
from xxhash import xxh3_64_digest

from clipfleet.shared import layout
from clipfleet.shared.pipeline import Stage, StageOutput, Stats, TransientError
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store, s3_options_from_env, shard_name
from clipfleet.workers.app import broker_redis
from clipfleet.workers.extract.options import ExtractOptions
from clipfleet.shared.ids import pair_uids, utf8_bytes
from clipfleet.shared.language import LanguageTagger, language_bucket

# A URL shard id is segment * PARTS_PER_SEGMENT + part, so ids follow from the input.
PARTS_PER_SEGMENT = 1000
CLAIM_BATCH = 2000  # URLs per Redis round trip


# ----------------------------------------------------------------------------- reading WATs

def open_wat(uri: str):
    """A binary stream of the WAT at `uri` (local path, http(s):// or s3://), read as it goes."""
    protocol = fsspec.utils.get_protocol(uri)
    options = {}
    if protocol == "s3":
        options = {**s3_options_from_env(), "default_block_size": 8 * 2**20}
    elif protocol in ("http", "https"):
        options = {"block_size": 0}  # a plain streaming GET, no range requests
    return fsspec.open(uri, "rb", **options)


class _SourceReader(io.RawIOBase):
    """What fastwarc reads through: passes bytes on, keeps the first and the last ones and
    any error of the underlying stream, so a network failure is told apart from bad data."""

    TAIL_BYTES = 4 * 2**20

    def __init__(self, raw):
        self.raw = raw
        self.position = 0
        self.head = b""
        self.tail = bytearray()
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # fastwarc asks where it is; it never seeks
        return self.position

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.raw.read(size)
        except Exception as exc:
            self.error = exc
            raise
        if self.position == 0:
            self.head = data[:2]
        self.position += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.TAIL_BYTES:
            del self.tail[:-self.TAIL_BYTES]
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


GZIP_MAGIC = b"\x1f\x8b\x08"


def gzip_tail_truncated(tail: bytes) -> bool:
    """True when `tail`, the end of a gzip file, stops inside a gzip member.

    fastwarc reads a cut-off file quietly, so we look at the last member ourselves: from
    the end, find the first offset that starts a member that inflates, and see whether
    the file ends exactly where that member ends.
    """
    start = len(tail)
    while (start := tail.rfind(GZIP_MAGIC, 0, start)) >= 0:
        flags = tail[start + 3] if start + 3 < len(tail) else 0
        if flags & 0xE0:
            continue  # reserved flag bits set: not a member header
        inflater = zlib.decompressobj(31)
        try:
            inflater.decompress(tail[start:])
        except zlib.error:
            continue  # the magic bytes were inside compressed data
        return not inflater.eof or bool(inflater.unused_data)
    return False


def iter_record_payloads(source, stats: Counter) -> Iterator[bytes]:
    """The JSON payloads of a WAT's metadata records that may hold image links.

    Records without an `IMG@` link path cannot yield a pair and are not parsed at all;
    that skips request and warcinfo records and pages without images cheaply.
    """
    from fastwarc.warc import ArchiveIterator, WarcRecordType
    reader = _SourceReader(source)
    records = ArchiveIterator(reader, record_types=WarcRecordType.metadata, parse_http=False)
    count = 0
    try:
        for count, record in enumerate(records, 1):
            body = record.reader.read()
            if len(body) < record.content_length:
                stats["truncated_record"] += 1
                continue
            if b"IMG@" in body:
                yield body
    except BaseException as exc:  # fastwarc's Rust panics are BaseExceptions
        if reader.error is not None and not isinstance(reader.error, SoftTimeLimitExceeded):
            raise TransientError(f"reading the WAT failed: {reader.error!r}") from reader.error
        if not isinstance(exc, (OSError, ValueError)) and type(exc).__name__ != "PanicException":
            raise  # a time limit, a shutdown: not a property of the file
        stats["unreadable_tail"] += 1  # the rest of the file cannot be parsed
    finally:
        _count(stats, "records", count)
    if reader.head == GZIP_MAGIC[:2] and gzip_tail_truncated(bytes(reader.tail)):
        stats["truncated_gzip"] += 1


def page_links(body: bytes, stats: Counter) -> tuple[str, str, list] | None:
    """(page URL, base URL for relative links, Links) of one WAT record, or None when it
    holds no HTML links; a broken record is counted under why it is broken."""
    try:
        doc = json.loads(body)
    except UnicodeDecodeError:
        stats["non_utf8_record"] += 1
        return None
    except (ValueError, RecursionError):
        stats["malformed_json"] += 1
        return None
    try:
        envelope = doc["Envelope"]
        page_url = envelope["WARC-Header-Metadata"]["WARC-Target-URI"]
        payload = envelope["Payload-Metadata"]
    except (KeyError, TypeError):
        stats["malformed_record"] += 1
        return None
    try:
        html = payload["HTTP-Response-Metadata"]["HTML-Metadata"]
        links = html["Links"]
    except (KeyError, TypeError):
        stats["not_html"] += 1
        return None
    if not isinstance(page_url, str) or not isinstance(links, list) or not _is_text(page_url):
        stats["malformed_record"] += 1
        return None
    base = (html.get("Head") or {}).get("Base") if isinstance(html.get("Head"), dict) else None
    base_url = page_url
    if isinstance(base, str) and base.strip():
        try:
            base_url = join_base(page_url, base.strip())  # a relative <base> is relative to the page
        except ValueError:
            pass
    return page_url, base_url, links


# ----------------------------------------------------------------------------- hygiene

# C0/C1 controls that are not whitespace, and lone surrogates (a JSON "\ud800" escape), which
# are not text and which no UTF-8 shard could hold
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_HTML_SPACE = " \t\n\r\x0c"


def _is_text(value: str) -> bool:
    """False for a string with a lone surrogate, which cannot be written as UTF-8."""
    return value.isascii() or not _SURROGATE.search(value)


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_alt(alt: str) -> str:
    """Alt text with control characters removed, whitespace runs made one space, ends stripped."""
    if not alt.isprintable():  # most alts have nothing to remove
        alt = _CONTROL.sub("", alt)
    return " ".join(alt.split())


def normalise_alt(alt: str, max_length: int) -> str:
    """Alt text as a caption: cleaned, then cut at `max_length` characters."""
    return clean_alt(alt)[:max_length]


# An http(s) base URL that urlparse takes apart at the first "://", "/", "?" and "#" alone:
# ASCII, and without what urlsplit removes or checks (tabs, newlines, IPv6 brackets) or
# urlparse splits off as parameters (";").
_PLAIN_HTTP_BASE = re.compile(r"(https?)://([^/?#]+)([^?#]*)", re.ASCII | re.IGNORECASE)
_SPLIT_CHANGES = re.compile(r"[\t\n\r;\[\]]")


class PageUrls:
    """Resolves a page's links against its base URL, as urllib.parse.urljoin does.

    urljoin costs about 5 us a link; this does the common cases (root-relative, relative,
    scheme-relative, with or without dot segments) with urljoin's own path algorithm on a
    base parsed once per page, and hands anything unusual to urljoin itself. Absolute
    http(s) URLs are kept as the page wrote them.
    """

    def __init__(self, base_url: str):
        self.base_url = base_url
        plain = _PLAIN_HTTP_BASE.match(base_url) if base_url.isascii() else None
        if plain is not None and not _SPLIT_CHANGES.search(base_url):
            scheme, netloc, path = plain[1].lower(), plain[2], plain[3]  # what urlparse gives, 5x faster
        else:
            try:
                scheme, netloc, path = urlparse(base_url)[:3]
            except ValueError:  # resolve() hands every relative link to urljoin, which fails alike
                scheme, netloc, path = "", "", ""
        self.scheme = scheme
        self.prefix = f"{scheme}://{netloc}"
        self.fast = scheme in ("http", "https") and bool(netloc)
        directory = path.split("/")
        if directory[-1] != "":
            del directory[-1]  # the last segment is a file name, not a directory
        self.directory = directory

    def directory_up(self, up: int) -> str:
        """What resolve() puts between the prefix and a relative path that starts with `up`
        times "../" and holds no other "." or ".." segment and no empty one: the directory,
        its dot segments and empty segments resolved, less `up` segments."""
        resolved: list[str] = []
        for segment in self.directory[:1] + [s for s in self.directory[1:] if s]:
            if segment == "..":
                if resolved:
                    resolved.pop()
            elif segment != ".":
                resolved.append(segment)
        del resolved[max(0, len(resolved) - up):]
        return "/".join(resolved) + "/" if resolved else "/"

    def resolve(self, src: str) -> str:
        head = src[:8].lower()
        if head.startswith("http://") or head.startswith("https://"):
            return src
        if not self.fast or ";" in src or not src.isprintable():
            return urljoin(self.base_url, src)
        cut = len(src)
        for mark in ("?", "#"):
            at = src.find(mark, 0, cut)
            if at != -1:
                cut = at
        path, rest = src[:cut], src[cut:]
        colon = path.find(":")
        if colon != -1 and "/" not in path[:colon]:
            return urljoin(self.base_url, src)  # a scheme of its own (mailto:, ftp:...)
        if not path or _empty_query_or_fragment(rest):
            return urljoin(self.base_url, src)  # urljoin's special cases
        if path.startswith("//"):
            if len(path) == 2 or path[2] == "/":
                return urljoin(self.base_url, src)  # no host after the slashes
            return f"{self.scheme}:{src}"
        if path[0] == "/":
            segments = path.split("/")
        else:
            segments = self.directory + path.split("/")
            segments[1:-1] = [s for s in segments[1:-1] if s]
        resolved: list[str] = []
        for segment in segments:
            if segment == "..":
                if resolved:
                    resolved.pop()
            elif segment != ".":
                resolved.append(segment)
        if segments[-1] in (".", ".."):
            resolved.append("")
        joined = "/".join(resolved) or "/"
        if joined[0] != "/":
            joined = "/" + joined
        return f"{self.prefix}{joined}{rest}"


def _empty_query_or_fragment(rest: str) -> bool:
    """urlunparse drops a "?" with nothing after it, and a "#" likewise."""
    if not rest:
        return False
    if rest[0] == "?":
        if len(rest) == 1 or rest[1] == "#":
            return True
        hash_at = rest.find("#")
        return hash_at == len(rest) - 1
    return len(rest) == 1


_ABSOLUTE_BASE = re.compile(r"https?://[^/?#;\[\]\s]+[^?#;\[\]\s]*", re.ASCII)


def join_base(page_url: str, base: str) -> str:
    """urljoin(page_url, base): the base for a page's relative links. urljoin gives back a
    plain absolute http(s) <base> as it is (lower-case scheme, a host, no parameters, query
    or fragment for it to rewrite) once the page URL parses, so that common case skips its
    5 us; anything else, and any ValueError, is urljoin's own."""
    if base.isascii() and _ABSOLUTE_BASE.fullmatch(base) and page_url.isascii() \
            and not _SPLIT_CHANGES.search(page_url):
        return base
    return urljoin(page_url, base)


def resolve_url(src: str, base_url: str) -> str:
    """The absolute URL of a link as the page wrote it."""
    return PageUrls(base_url).resolve(src)


def url_drop_reason(url: str, max_length: int, drop_extensions: tuple[str, ...]) -> str | None:
    """Why an absolute image URL is not kept, or None to keep it."""
    head = url[:8].lower()
    if not (head.startswith("http://") or head.startswith("https://")):
        return "not_http"
    if len(url) > max_length:
        return "long_url"
    if drop_extensions:
        try:
            if _path_ends_with(url, drop_extensions):
                return "extension"
        except ValueError:  # urlsplit rejects the host, a broken IPv6 literal: no URL to fetch
            return "bad_url"
    return None


def _path_ends_with(url: str, extensions: tuple[str, ...]) -> bool:
    """Whether the URL's path (not its query or fragment) ends with one of `extensions`."""
    if "?" not in url and "#" not in url and not url.lower().endswith(extensions):
        return False  # the common case, without parsing
    return urlsplit(url).path.lower().endswith(extensions)


def image_pairs(links: list, base_url: str, cfg: ExtractOptions, stats: Counter) -> list[tuple[str, str]]:
    """(absolute URL, caption) of each IMG@/src link of a page that passes the rules."""
    page = PageUrls(base_url)
    min_alt, max_alt = cfg.min_alt_length, cfg.max_alt_length
    max_url, extensions = cfg.max_url_length, tuple(e.lower() for e in cfg.drop_extensions)
    pairs = []
    img_links = 0
    for link in links:
        try:
            if link.get("path") != "IMG@/src":
                continue
        except AttributeError:  # not an object
            continue
        img_links += 1
        alt, src = link.get("alt"), link.get("url")
        if alt.__class__ is not str:
            stats["drop_no_alt"] += 1
            continue
        caption = clean_alt(alt)
        if len(caption) < min_alt:
            stats["drop_short_alt"] += 1
            continue
        if src.__class__ is not str or not (src := src.strip(_HTML_SPACE)):
            stats["drop_no_url"] += 1
            continue
        if src[0] in "dDjJ":
            head = src[:11].lower()
            if head.startswith("data:"):
                stats["drop_data_uri"] += 1
                continue
            if head.startswith("javascript:"):
                stats["drop_javascript"] += 1
                continue
        try:
            url = page.resolve(src)
        except ValueError:
            stats["drop_bad_url"] += 1
            continue
        if not _is_text(url):
            stats["drop_bad_url"] += 1
            continue
        reason = url_drop_reason(url, max_url, extensions)
        if reason is not None:
            stats["drop_" + reason] += 1
            continue
        if len(caption) > max_alt:
            caption = caption[:max_alt]
            stats["alt_truncated"] += 1
        pairs.append((url, caption))
    stats["img_links"] += img_links
    return pairs


def page_pairs(source, cfg: ExtractOptions, stats: Counter) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(page_url, its pairs) for every page of a WAT stream with pairs, in record order, one
    record and one link at a time: the rules as written, which the columnar path must match."""
    for body in iter_record_payloads(source, stats):
        page = page_links(body, stats)
        if page is None:
            continue
        page_url, base_url, links = page
        pairs = image_pairs(links, base_url, cfg, stats)
        if pairs:
            yield page_url, pairs


def extract_pairs(source, cfg: ExtractOptions, stats: Counter) -> Iterator[tuple[str, str, str]]:
    """(url, caption, page_url) of every pair in a WAT stream, before dedup, in record order."""
    for pairs in iter_pair_batches(source, cfg, stats):
        yield from zip(*(_strings(pairs[name]) for name in PAIR_COLUMNS))


# ----------------------------------------------------------------------------- the columnar path
#
# page_links and image_pairs take one record and one link at a time, and that Python work
# costs more per record than reading the WAT. So a segment goes through the same rules as
# columns: pyarrow parses a batch of records into arrays of just the fields we read, the rules
# run as array operations, and Python is left what arrays do badly (the few alts that need
# cleaning, relative URLs with dot segments or a query, URLs that may end in a dropped
# extension). Records that pyarrow could read differently from json.loads take the
# one-record path, so pairs and counts are the same either way; tests/extract/test_columnar.py
# holds the two paths side by side.

RECORDS_PER_BATCH = 2000   # records per pyarrow parse, a few MB of JSON
_JSON_SPACE = b" \t\n\r"   # what json.loads skips around a document


def _wat_schema() -> pa.Schema:
    """The fields of a WAT record that extraction reads; pyarrow skips all others."""
    link = pa.struct([("path", pa.string()), ("url", pa.string()), ("alt", pa.string())])
    html = pa.struct([("Head", pa.struct([("Base", pa.string())])), ("Links", pa.list_(link))])
    payload = pa.struct([("HTTP-Response-Metadata", pa.struct([("HTML-Metadata", html)]))])
    header = pa.struct([("WARC-Target-URI", pa.string())])
    return pa.schema([("Envelope", pa.struct([("WARC-Header-Metadata", header), ("Payload-Metadata", payload)]))])


_PARSE_OPTIONS = pa_json.ParseOptions(explicit_schema=_wat_schema(), unexpected_field_behavior="ignore")


# Byte tests on many strings at once (see _has_bytes). A test for an ASCII byte is exact, as
# no byte of a multi-byte UTF-8 character is ASCII; a lead byte (0xc2 and up) stands for all
# the characters it starts, a superset that costs only a closer look.
_MAY_NEED_CLEANING = [((0x00, 0x1f),), ((0x7f, 0x7f),), ((0xc2, 0xc2), (0x80, 0xa0)),
                      ((0xe1, 0xe1), (0x9a, 0x9a)), ((0xe2, 0xe2), (0x80, 0x81)), ((0xe3, 0xe3), (0x80, 0x80))]
# ... the ASCII controls, and the first two bytes of every other character that clean_alt
# removes or splits on (U+0080-U+00A0, U+1680, U+2000-U+205F, U+3000); test_columnar checks
# this against the whole of Unicode.
_NOT_PLAIN_URL = [((0x00, 0x20),), ((0x7f, 0xff),), ((0x3b, 0x3b),), ((0x3f, 0x3f),), ((0x23, 0x23),)]
# ... a relative link that PageUrls joins to its base as it is: printable ASCII without
# spaces, ";" (handed to urljoin), "?" or "#" (a query or fragment is taken apart).
_URL_SPECIAL = [((0x80, 0xff),), ((0x09, 0x09),), ((0x0a, 0x0a),), ((0x0d, 0x0d),), ((0x3f, 0x3f),),
                ((0x23, 0x23),)]
# ... a URL whose extension test needs urlsplit or Unicode lower(): url_drop_reason tests the
# path before any query or fragment, and urlsplit drops tabs and newlines first.


class LinkRules:
    """image_pairs' settings, from a run config."""

    def __init__(self, cfg: ExtractOptions):
        self.cfg = cfg
        self.min_alt, self.max_alt, self.max_url = cfg.min_alt_length, cfg.max_alt_length, cfg.max_url_length
        self.extensions = tuple(e.lower() for e in cfg.drop_extensions)


def json_bracket_limit() -> int:
    """Fewer nested arrays and objects than this cannot make json.loads, called a little below
    the caller's frame, hit the recursion limit. json.loads counts a record nested that deep
    as malformed and pyarrow parses it, so deeper records are left to json.loads."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    return min(sys.getrecursionlimit(), 1000) - depth - 50


def arrow_reads_like_json(text: bytes, bracket_limit: int) -> bool:
    """Whether pyarrow may parse this record (its payload stripped of JSON whitespace) in a
    batch, as far as a look at its bytes tells. It must be one line that starts an object:
    pyarrow reads a line at a time, takes a byte order mark, and crashes on a top-level null
    at the start of its input (pyarrow 20). It must also nest less deeply than json.loads can
    follow, since pyarrow has no such limit. The rest is found by parsing: bad UTF-8 is checked
    for a whole batch at once, and a record that pyarrow rejects or reads as other than one
    row goes to json.loads too."""
    return (text[:1] == b"{" and b"\n" not in text and b"\r" not in text
            and text.count(b"{") + text.count(b"[") < bracket_limit)


def valid_utf8(data: bytes) -> bool:
    """Whether `data` is UTF-8 as Python's strict decoder takes it, checked by pyarrow, which
    is several times faster. pyarrow does not check the UTF-8 of the fields it skips, and
    json.loads rejects a record with bad UTF-8 anywhere."""
    offsets = np.array([0, len(data)], dtype=np.int64)
    text = pa.Array.from_buffers(pa.large_string(), 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


PAIR_COLUMNS = ("url", "caption", "page_url")
_PAIRS_SCHEMA = pa.schema([(name, pa.string()) for name in PAIR_COLUMNS])


def _pairs_table(urls, captions, pages) -> pa.Table:
    return pa.Table.from_arrays([urls, captions, pages], schema=_PAIRS_SCHEMA)


def iter_pair_batches(source, cfg: ExtractOptions, stats: Counter) -> Iterator[pa.Table]:
    """The pairs of a WAT stream, before dedup, as tables of url, caption and page_url, a
    batch of records at a time, in record order."""
    rules = LinkRules(cfg)
    bracket_limit = json_bracket_limit()
    bodies: list[bytes] = []
    for body in iter_record_payloads(source, stats):
        bodies.append(body)
        if len(bodies) >= RECORDS_PER_BATCH:
            yield batch_pairs(bodies, rules, stats, bracket_limit)
            bodies = []
    if bodies:
        yield batch_pairs(bodies, rules, stats, bracket_limit)


def batch_pairs(bodies: list[bytes], rules: LinkRules, stats: Counter, bracket_limit: int) -> pa.Table:
    """The pairs of a batch of record payloads, in record order, with the counts that
    page_links and image_pairs would make of them."""
    out: list[pa.Table] = []
    texts = [body.strip(_JSON_SPACE) for body in bodies]
    data = b"\n".join(texts)
    all_utf8 = valid_utf8(data)
    columnar = [arrow_reads_like_json(text, bracket_limit) and (all_utf8 or _is_utf8(text)) for text in texts]
    if all(columnar):
        _columnar_pairs(bodies, texts, rules, stats, out, data)  # the usual batch, parsed whole
    else:  # runs of records for pyarrow, and in between those for json.loads, in order
        start = 0
        for i, ok in enumerate(columnar + [False]):
            if not ok:
                if start < i:
                    _columnar_pairs(bodies[start:i], texts[start:i], rules, stats, out)
                if i < len(bodies):
                    _record_pairs(bodies[i], rules, stats, out)
                start = i + 1
    return pa.concat_tables(out) if out else _PAIRS_SCHEMA.empty_table()


def _record_pairs(body: bytes, rules: LinkRules, stats: Counter, out: list[pa.Table]) -> None:
    """One record the way page_pairs takes it."""
    page = page_links(body, stats)
    if page is None:
        return
    page_url, base_url, links = page
    pairs = image_pairs(links, base_url, rules.cfg, stats)
    if pairs:
        out.append(_pairs_table(pa.array([url for url, _ in pairs], pa.string()),
                                pa.array([caption for _, caption in pairs], pa.string()),
                                pa.array([page_url] * len(pairs), pa.string())))


def _columnar_pairs(bodies: list[bytes], texts: list[bytes], rules: LinkRules, stats: Counter,
                    out: list[pa.Table], data: bytes | None = None) -> None:
    """Records parsed together by pyarrow. One record pyarrow rejects spoils the parse of its
    batch, so a rejected batch is halved until the rejected records are alone, and each of
    those goes to page_links, which counts why it is bad. A record that holds more than one
    JSON document gives pyarrow more rows than records, and is found the same way."""
    try:
        data = b"\n".join(texts) if data is None else data
        table = pa_json.read_json(pa.BufferReader(data), parse_options=_PARSE_OPTIONS,
                                  read_options=pa_json.ReadOptions(use_threads=False, block_size=len(data) + 1))
    except (pa.ArrowException, ValueError):  # ArrowInvalid for bad JSON, a UnicodeDecodeError for its message
        table = None
    if table is not None and table.num_rows == len(texts):
        _table_pairs(table, bodies, rules, stats, out)
    elif len(texts) == 1:
        _record_pairs(bodies[0], rules, stats, out)
    else:
        half = len(texts) // 2
        _columnar_pairs(bodies[:half], texts[:half], rules, stats, out)
        _columnar_pairs(bodies[half:], texts[half:], rules, stats, out)


def _strings(array) -> list:
    """A pyarrow string array as a list of str (None for nulls); many times faster than to_pylist."""
    return array.to_numpy(zero_copy_only=False).tolist()


def _mask(array, null: bool = False) -> np.ndarray:
    """A boolean pyarrow array as numpy, nulls as `null`."""
    return array.fill_null(null).to_numpy(zero_copy_only=False)


def _string_bytes(strings) -> tuple[np.ndarray, np.ndarray]:
    """The offsets and the UTF-8 bytes of a pyarrow string array, without copying: string i
    is data[offsets[i] - offsets[0]:offsets[i + 1] - offsets[0]]."""
    _, offsets, data = strings.buffers()
    offsets = np.frombuffer(offsets, np.int32)[strings.offset:strings.offset + len(strings) + 1]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return offsets, data[offsets[0]:offsets[-1]]


def _has_bytes(strings, tests: Iterable[tuple[tuple[int, int], ...]]) -> np.ndarray:
    """Which strings hold a run of bytes that one of the tests matches: a test is a (low, high)
    range for each byte of the run. A numpy pass over all the bytes of the strings per test,
    where a pyarrow regex costs about 80 ns a string. A run across two strings is a false
    alarm for the first, never a miss."""
    offsets, data = _string_bytes(strings)
    found = np.zeros(len(strings), dtype=bool)
    for test in tests:
        at = np.flatnonzero(_in_range(data, *test[0]))
        for shift, (low, high) in enumerate(test[1:], 1):  # the next bytes, where the first matched
            at = at[at + shift < len(data)]
            at = at[_in_range(data[at + shift], low, high)]
        found[np.searchsorted(offsets, at + offsets[0], side="right") - 1] = True
    return found


def _in_range(data: np.ndarray, low: int, high: int) -> np.ndarray:
    if low == high:
        return data == low
    if low == 0:
        return data <= high
    return (data >= low) & (data <= high) if high < 0xff else data >= low


def _run(text: str) -> tuple[tuple[int, int], ...]:
    """A _has_bytes test for this ASCII text."""
    return tuple((ord(c), ord(c)) for c in text)


def _starts(lower, *prefixes: str) -> np.ndarray:
    """Which strings start with one of the prefixes (lower case, ASCII). Pass strings through
    pc.ascii_lower: that is src[:n].lower() for these prefixes, since lower() turns no other
    character into an ASCII letter of them (only U+212A becomes "k", and U+0130 an "i" with a
    combining dot after it, which cannot complete a prefix)."""
    hit = _mask(pc.starts_with(lower, prefixes[0]))
    for prefix in prefixes[1:]:
        hit |= _mask(pc.starts_with(lower, prefix))
    return hit


def _count(stats: Counter, reason: str, n) -> None:
    if n:  # like the one-record path, a count that never happened is not in the stats at all
        stats[reason] += int(n)


def _drop(stats: Counter, reason: str, alive: np.ndarray, mask: np.ndarray) -> None:
    """Counts the links still alive that `mask` drops, and takes them out of `alive`."""
    dropped = alive & mask
    _count(stats, reason, dropped.sum())
    alive &= ~dropped


def _table_pairs(table, bodies: list[bytes], rules: LinkRules, stats: Counter, out: list[pa.Table]) -> None:
    """page_links and image_pairs over every record of a parsed batch at once."""
    envelope = table.column("Envelope").combine_chunks()
    page = pc.struct_field(pc.struct_field(envelope, "WARC-Header-Metadata"), "WARC-Target-URI")
    html = pc.struct_field(pc.struct_field(pc.struct_field(envelope, "Payload-Metadata"),
                                           "HTTP-Response-Metadata"), "HTML-Metadata")
    links = pc.struct_field(html, "Links")
    # A record without a page URL or without Links yields no pair, but whether page_links
    # counts it as malformed or as not HTML turns on keys that pyarrow reads as null whether
    # they are missing or null: page_links counts those few itself.
    unusable = _mask(pc.is_null(page)) | _mask(pc.is_null(links))
    for i in np.flatnonzero(unusable).tolist():
        page_links(bodies[i], stats)  # None for each of them
    usable = pa.array(~unusable)
    page_urls = page.filter(usable)
    base_urls = _base_urls(page_urls, pc.struct_field(pc.struct_field(html, "Head"), "Base").filter(usable))
    links = links.filter(usable)
    flat = pc.list_flatten(links)
    images = pa.array(_mask(pc.equal(pc.struct_field(flat, "path"), "IMG@/src")))
    flat = flat.filter(images)
    page_of = pc.list_parent_indices(links).filter(images).to_numpy()
    _count(stats, "img_links", len(flat))

    alt = pc.struct_field(flat, "alt")
    alive = _mask(pc.is_valid(alt))
    _count(stats, "drop_no_alt", len(alive) - alive.sum())
    caption = _clean_alts(alt, alive)
    caption_length = pc.utf8_length(caption).fill_null(0).to_numpy()
    _drop(stats, "drop_short_alt", alive, caption_length < rules.min_alt)

    src = pc.utf8_trim(pc.struct_field(flat, "url"), characters=_HTML_SPACE)
    _drop(stats, "drop_no_url", alive, _mask(pc.equal(src, ""), null=True))
    lower = pc.ascii_lower(src)
    _drop(stats, "drop_data_uri", alive, _starts(lower, "data:"))
    _drop(stats, "drop_javascript", alive, _starts(lower, "javascript:"))
    url = _resolve_links(src, alive & ~_starts(lower, "http://", "https://"), page_of, base_urls, alive, stats)
    _url_rules(url, alive, rules, stats)

    truncated = alive & (caption_length > rules.max_alt)
    if truncated.any():
        _count(stats, "alt_truncated", truncated.sum())
        caption = pc.utf8_slice_codeunits(caption, 0, rules.max_alt)  # code points, as str slicing
    keep = np.flatnonzero(alive)
    out.append(_pairs_table(url.take(keep), caption.take(keep), page_urls.take(page_of[keep])))


def _clean_alts(alt, alive: np.ndarray):
    """clean_alt of every alt alive; the few that it may change go through it in Python
    (pyarrow's regex replace is no faster for them)."""
    suspect = alive & (_has_bytes(alt, _MAY_NEED_CLEANING + [_run("  ")])
                       | _mask(pc.starts_with(alt, " ")) | _mask(pc.ends_with(alt, " ")))
    if not suspect.any():
        return alt
    suspect = pa.array(suspect)
    cleaned = [clean_alt(text) for text in _strings(alt.filter(suspect))]
    return pc.replace_with_mask(alt, suspect, pa.array(cleaned, pa.string()))


def _base_urls(page_urls, base) -> list[str]:
    """Each page's base for relative links, as page_links makes it from <base>."""
    base_urls = _strings(page_urls)
    if base.null_count < len(base):
        with_base = np.flatnonzero(_mask(pc.is_valid(base)))
        for i, value in zip(with_base.tolist(), _strings(base.take(with_base))):
            if value.strip():
                try:
                    base_urls[i] = join_base(base_urls[i], value.strip())
                except ValueError:
                    pass
    return base_urls


def _resolve_links(src, relative: np.ndarray, page_of: np.ndarray, base_urls: list[str],
                   alive: np.ndarray, stats: Counter):
    """src with the `relative` links resolved as PageUrls.resolve does, and drop_bad_url
    where it fails. Where PageUrls would just join a link to its page's scheme, host or
    directory, or return it as it is, that is done as arrays; the rest go through PageUrls
    one by one."""
    if not relative.any():
        return src
    pages = {i: PageUrls(base_urls[i]) for i in np.unique(page_of[relative]).tolist()}
    fast = np.zeros(len(base_urls), dtype=bool)
    fast[list(pages)] = [page.fast for page in pages.values()]
    plain = relative & fast[page_of] & ~_has_bytes(src, _NOT_PLAIN_URL)
    slash, two_slashes = _mask(pc.starts_with(src, "/")), _mask(pc.starts_with(src, "//"))
    # "/img/a.jpg" -> "http://host/img/a.jpg", where no segment could be "." or ".."
    root = plain & slash & ~two_slashes & ~_has_bytes(src, [_run("/.")])
    url = _joined(src, root, page_of, {i: page.prefix for i, page in pages.items()}, "")
    # "//cdn/a.jpg" -> "https://cdn/a.jpg", where a host follows the slashes
    scheme_relative = plain & two_slashes & ~_mask(pc.starts_with(src, "///")) & \
        (pc.utf8_length(src).fill_null(0).to_numpy() > 2)
    url = _joined(url, scheme_relative, page_of, {i: page.scheme for i, page in pages.items()}, ":")
    # a ":" before any "/" starts a scheme of the link's own, which PageUrls hands to urljoin
    colon = ~slash & _has_bytes(src, [_run(":")])
    url, path_relative = _join_path_relative(url, src, plain & ~slash & ~colon, page_of, pages)
    as_written = _own_scheme(src, plain & colon)

    rest = np.flatnonzero(relative & ~root & ~scheme_relative & ~path_relative & ~as_written)
    resolved_at, resolved = [], []
    for at, link_src, page_index in zip(rest.tolist(), _strings(src.take(rest)), page_of[rest].tolist()):
        try:
            resolved.append(pages[page_index].resolve(link_src))
            resolved_at.append(at)
        except ValueError:
            stats["drop_bad_url"] += 1
            alive[at] = False
    replace = np.zeros(len(alive), dtype=bool)
    replace[resolved_at] = True
    return pc.replace_with_mask(url, pa.array(replace), pa.array(resolved, pa.string()))


def _joined(url, where: np.ndarray, page_of: np.ndarray, heads: dict[int, str], separator: str):
    """url with its page's head + separator + url itself, where `where` is set."""
    at = np.flatnonzero(where)
    if not len(at):
        return url
    tails = url.take(at)
    heads = pa.array([heads[page] for page in page_of[at].tolist()], pa.string())
    return pc.replace_with_mask(url, pa.array(where), pc.binary_join_element_wise(heads, tails, separator))


def _own_scheme(src, candidates: np.ndarray) -> np.ndarray:
    """Which candidates ("ftp://host/a.jpg", "mailto:x") urljoin returns as they are: a scheme
    that urlsplit takes (a letter, then letters, digits, "+", "-" or "."), other than http and
    https (the page's is one of those), and no "[" or "]" that urlsplit could reject."""
    own = np.zeros(len(src), dtype=bool)
    at = np.flatnonzero(candidates)
    if len(at):
        links = src.take(at)
        scheme = _mask(pc.match_substring_regex(links, "^[A-Za-z][A-Za-z0-9+.\\-]*:"))
        http = _starts(pc.ascii_lower(links), "http:", "https:")
        own[at] = scheme & ~http & ~_has_bytes(links, [_run("["), _run("]")])
    return own


def _join_path_relative(url, src, candidates: np.ndarray, page_of: np.ndarray,
                        pages: dict[int, PageUrls]):
    """Relative paths ("a.jpg", "../../img/a.jpg") joined to their page's directory, less a
    segment for each leading "../", where the rest holds no "." or ".." segment and no empty
    one; (url, which links were joined)."""
    joined = np.zeros(len(url), dtype=bool)
    at = np.flatnonzero(candidates)
    if not len(at):
        return url, joined
    link_src = src.take(at)
    rest = pc.replace_substring_regex(link_src, "^(\\.\\./)+", "")
    ups = (pc.utf8_length(link_src).to_numpy() - pc.utf8_length(rest).to_numpy()) // 3
    simple = ~(_has_bytes(rest, [_run("/."), _run("//")]) | _mask(pc.starts_with(rest, "."))
               | _mask(pc.starts_with(rest, "/")))
    at, ups, rest = at[simple], ups[simple], rest.filter(pa.array(simple))
    if not len(at):
        return url, joined
    # the directory part once per page and number of "../"
    width = int(ups.max()) + 1
    keys, key_of = np.unique(page_of[at] * width + ups, return_inverse=True)
    heads = [pages[key // width].prefix + pages[key // width].directory_up(key % width) for key in keys.tolist()]
    joined[at] = True
    return pc.replace_with_mask(url, pa.array(joined), pc.binary_join_element_wise(
        pa.array(heads, pa.string()).take(key_of), rest, "")), joined


def _url_rules(url, alive: np.ndarray, rules: LinkRules, stats: Counter) -> None:
    """url_drop_reason of every link alive, in its order: not http(s), too long, a dropped
    extension at the end of the path. The extension is tested as arrays for plain ASCII URLs,
    and one by one in Python for the others."""
    lower = pc.ascii_lower(url)
    _drop(stats, "drop_not_http", alive, ~_starts(lower, "http://", "https://"))
    _drop(stats, "drop_long_url", alive, pc.utf8_length(url).fill_null(0).to_numpy() > rules.max_url)
    if not rules.extensions:
        return
    if all(ext.isascii() for ext in rules.extensions):
        one_by_one = alive & _has_bytes(url, _URL_SPECIAL + [_run("["), _run("]")])
        _drop(stats, "drop_extension", alive, ~one_by_one & _path_ends(url, lower, alive & ~one_by_one, rules.extensions))
    else:
        one_by_one = alive.copy()
    check = np.flatnonzero(one_by_one)
    for at, value in zip(check.tolist(), _strings(url.take(check))):
        reason = url_drop_reason(value, rules.max_url, rules.extensions)
        if reason is not None:
            stats["drop_" + reason] += 1
            alive[at] = False


def _path_ends(url, lower, candidates: np.ndarray, extensions: tuple[str, ...]) -> np.ndarray:
    """_path_ends_with for ASCII http(s) URLs without "?", "#", tabs, newlines or brackets:
    urlsplit takes the path from the first "/" after "scheme://" to the end, so a URL that ends
    with an extension has a path that ends with it when that path is at least as long."""
    ends = np.zeros(len(url), dtype=bool)
    for ext in extensions:
        ends |= _mask(pc.ends_with(lower, ext))
    at = np.flatnonzero(candidates & ends)
    dropped = np.zeros(len(url), dtype=bool)
    if not len(at):
        return dropped
    links, links_lower = url.take(at), lower.take(at)
    https = _mask(pc.starts_with(links_lower, "https://"))
    after_scheme = pc.if_else(pa.array(https), pc.utf8_slice_codeunits(links, 8), pc.utf8_slice_codeunits(links, 7))
    slash = pc.find_substring(after_scheme, "/").to_numpy()
    length = pc.utf8_length(after_scheme).to_numpy()
    path_length = np.where(slash >= 0, length - slash, 0)
    found = np.zeros(len(at), dtype=bool)
    for ext in extensions:
        found |= _mask(pc.ends_with(links_lower, ext)) & (path_length >= len(ext))
    dropped[at] = found
    return dropped


# ----------------------------------------------------------------------------- dedup

def url_digest(text: str) -> bytes:
    """8 bytes identify a URL: at 50 billion URLs about 70 pairs collide (n^2 / 2^65).
    XXH3 is a well-mixed 64-bit hash, several times faster than BLAKE2b here; a digest only
    names a URL in the run's claims, and no one needs to recompute it from outside."""
    return xxh3_64_digest(text.encode("utf-8", "surrogatepass"))


def url_digests(texts) -> list[bytes]:
    """url_digest of each string of a pyarrow array (UTF-8 already)."""
    return [xxh3_64_digest(data) for data in utf8_bytes(texts)]


# A URL is claimed by the first segment that sees it; the claim stores that segment's
# number, so the same segment run again (a redelivered task) keeps what it claimed.
# The batch travels as one string of 8-byte digests and comes back as one string of
# "1" (ours) and "0" (another segment's): packing thousands of separate arguments and
# replies costs more in redis-py than the claims cost in Redis.
_CLAIM_SCRIPT = """
local owner, prefix, buckets, digests = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local kept = {}
for i = 1, #digests, 8 do
  local field = string.sub(digests, i, i + 7)
  local b1, b2, b3, b4 = string.byte(field, 1, 4)
  local bucket = math.floor((((b1 * 256 + b2) * 256 + b3) * 256 + b4) / (4294967296 / buckets))
  local key = prefix .. string.format('%x', bucket)
  if redis.call('HSETNX', key, field, owner) == 1 or redis.call('HGET', key, field) == owner then
    kept[#kept + 1] = '1'
  else
    kept[#kept + 1] = '0'
  end
end
return table.concat(kept)
"""

# Claims live in Redis hashes ("buckets") of about this many URLs: a small hash is stored as
# one compact list, far smaller than one Redis key per URL (see ops/dedup.md).
URLS_PER_BUCKET = 64
URLS_PER_SEGMENT = 400_000  # a Common Crawl WAT yields a few hundred thousand image links


def bucket_bits(segments: int) -> int:
    """log2 of the bucket count for a run of `segments` WATs; fixed for the run's life."""
    wanted = max(1, segments) * URLS_PER_SEGMENT / URLS_PER_BUCKET
    return max(8, min(32, math.ceil(math.log2(wanted))))


def dedup_namespace(cfg: RunConfig) -> str:
    """Redis key prefix of one run: its store and creation time, so a new run in the same
    store (after the old one was deleted) does not inherit old claims."""
    return "cf:dedup:" + hashlib.sha1(f"{cfg.store}\n{cfg.created_at!r}".encode()).hexdigest()[:12]


class RunDedup:
    """Fleet-wide claims of URL digests in Redis, one script call per batch.

    A digest's bucket is its first 32 bits scaled to 2**bits buckets; the bucket key is
    `namespace:hex(bucket)`, and the digest itself is the field.
    """

    def __init__(self, client, namespace: str, bits: int):
        self.client = client
        self.namespace = namespace
        self.buckets = 2 ** bits
        self._script = client.register_script(_CLAIM_SCRIPT)

    def bucket_key(self, digest: bytes) -> str:
        bucket = int.from_bytes(digest[:4], "big") // (2**32 // self.buckets)
        return f"{self.namespace}:{bucket:x}"

    def claim(self, digests: list[bytes], owner: int) -> list[bool]:
        """For each digest: True when `owner` holds it (claimed now or by an earlier run of
        the same segment), False when another segment got there first."""
        return self.claim_mask(digests, owner).tolist()

    def claim_mask(self, digests: list[bytes], owner: int) -> np.ndarray:
        """claim() as a numpy mask."""
        if not digests:
            return np.zeros(0, dtype=bool)
        try:
            kept = self._script(keys=[], args=[owner, f"{self.namespace}:", self.buckets, b"".join(digests)])
        except Exception as exc:  # redis-py's connection and timeout errors
            import redis
            if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                raise TransientError(f"dedup claims failed: {exc}") from exc
            raise
        return np.frombuffer(kept, dtype=np.uint8) == ord("1")


# ----------------------------------------------------------------------------- shards

class UrlShardWriter:
    """Collects kept pairs and writes them as parquet shards of `size` rows."""

    def __init__(self, out: Path, segment: int, size: int, tagger: LanguageTagger, stats: Counter):
        self.out, self.segment, self.size = out, segment, size
        self.tagger, self.stats = tagger, stats
        self.pending: list[pa.Table] = []  # pairs not yet in a shard, in order
        self.rows = 0
        self.files: dict[str, Path] = {}
        self.shards: list[int] = []

    def extend(self, pairs: pa.Table) -> None:
        """Pairs (url, caption, page_url) in order; a shard is written each time `size` are in."""
        self.pending.append(pairs)
        self.rows += len(pairs)
        while self.rows >= self.size:
            waiting = pa.concat_tables(self.pending)
            self._write(waiting.slice(0, self.size))
            self.pending = [waiting.slice(self.size)]
            self.rows = len(self.pending[0])

    def flush(self) -> None:
        if self.rows:
            self._write(pa.concat_tables(self.pending))
        self.pending, self.rows = [], 0

    def _write(self, pairs: pa.Table) -> None:
        import pyarrow.parquet as pq
        part = len(self.shards)
        if part >= PARTS_PER_SEGMENT:
            raise ValueError(f"segment {self.segment} yields more than {PARTS_PER_SEGMENT} URL shards; "
                             f"use a larger --shard-size")
        shard = self.segment * PARTS_PER_SEGMENT + part
        pairs = pairs.combine_chunks()
        captions = pairs["caption"].chunk(0) if pairs.num_rows else pa.array([], pa.string())
        # language ID once per distinct caption of the shard, spread back to its rows
        distinct = pc.dictionary_encode(captions)
        tags = self.tagger.tag_many(_strings(distinct.dictionary))
        languages = pa.array([code for code, _ in tags], pa.string()).take(distinct.indices)
        for count in pc.value_counts(languages).to_pylist():
            self.stats[f"lang_{language_bucket(count['values'])}"] += count["counts"]
        table = pa.table({
            "url": pairs["url"], "caption": captions, "page_url": pairs["page_url"], "language": languages,
            "language_score": pa.array([score for _, score in tags], pa.float32()).take(distinct.indices),
            "uid": pair_uids(pairs["url"], captions)})
        rel = layout.url_shard(shard)
        path = self.out / f"{shard_name(shard)}.parquet"
        # URLs and uids are all distinct: a dictionary for them is built only to be dropped
        pq.write_table(table, path, compression="zstd", use_dictionary=["caption", "page_url", "language"])
        self.files[rel] = path
        self.shards.append(shard)


# ----------------------------------------------------------------------------- the stage

CLAIMS_IN_FLIGHT = 8  # claim batches sent ahead of the pairs they decide


class ExtractStage(Stage):
    name = "extract"

    def __init__(self, run: RunConfig, redis_client=None):
        super().__init__(run)
        self.tagger = LanguageTagger(run.extract.min_language_score)
        self._redis = redis_client
        self._dedup: RunDedup | None = None

    @property
    def dedup(self) -> RunDedup:
        if self._dedup is None:
            client = self._redis if self._redis is not None else broker_redis()
            self._dedup = RunDedup(client, dedup_namespace(self.run_config),
                                   bucket_bits(len(self.run_config.inputs)))
        return self._dedup

    def run(self, store: Store, shard: int, out: Path, counts: Stats, wat: str) -> StageOutput:
        cfg = self.options
        stats: Counter = Counter()
        writer = UrlShardWriter(out, shard, self.run_config.input.shard_size, self.tagger, stats)
        by_uid = cfg.dedup_by == "uid"
        seen: set[bytes] = set()
        # Claims go to Redis from a thread, in order, while this one parses on: Redis does
        # its part meanwhile instead of us waiting for each reply. The pairs wait beside
        # their claim, and are written in order as the replies come back.
        in_flight: deque = deque()

        def write_claimed(block: bool) -> None:
            while in_flight and (block or in_flight[0][0].done() or len(in_flight) > CLAIMS_IN_FLIGHT):
                reply, pairs = in_flight.popleft()
                ours = reply.result()
                _count(stats, "drop_duplicate_in_run", len(ours) - ours.sum())
                writer.extend(pairs.filter(pa.array(ours)))

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dedup-claims") as claims:
            with open_wat(wat) as source:
                for pairs in iter_pair_batches(source, cfg, stats):
                    keys = pc.binary_join_element_wise(pairs["url"], pairs["caption"], "\n") if by_uid \
                        else pairs["url"]
                    digests = url_digests(keys)
                    fresh = [i for i, digest in enumerate(digests) if digest not in seen and not seen.add(digest)]
                    _count(stats, "drop_duplicate_in_segment", len(digests) - len(fresh))
                    fresh_pairs = pairs.take(fresh)
                    for start in range(0, len(fresh), CLAIM_BATCH):
                        batch = [digests[i] for i in fresh[start:start + CLAIM_BATCH]]
                        in_flight.append((claims.submit(self.dedup.claim_mask, batch, shard),
                                          fresh_pairs.slice(start, CLAIM_BATCH)))
                    write_claimed(block=False)
            write_claimed(block=True)
        writer.flush()
        stats["pairs"] = sum(stats[f"lang_{b}"] for b in ("en", "other", "none"))
        stats["url_shards"] = len(writer.shards)
        counts.update(dict(stats))
        return StageOutput(files=writer.files, next_shards=writer.shards)
