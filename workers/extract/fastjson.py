"""The part of a WAT record's JSON the rules read, parsed lazily with simdjson.

A metadata record is mostly headers the rules never look at; json.loads builds every one of
them as Python objects (about 18% of the stage's time on the bench's WATs), while simdjson's
lazy parse validates the whole document and builds only what is asked for here: the page URL,
the Links array and the Head. It answers only for a well-formed record of the usual shape;
anything else (invalid JSON or UTF-8, a "\\ud800" escape, a missing or odd field) returns
None, and the standard parse in rules.page_links decides and counts it as it always has.
"""
from __future__ import annotations

import sys
import threading

import simdjson

# Fewer brackets than this cannot nest as deep as json.loads' recursion limit (half of it: the
# caller's own frames count against it too); a page with more links takes the standard parse.
_MAX_BRACKETS = sys.getrecursionlimit() // 2
_local = threading.local()  # a simdjson parser serves one document at a time: one per thread


def _parser() -> simdjson.Parser:
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    return parser


def _plain(value):
    """A lazy simdjson value as the Python value json.loads would give."""
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def record_parts(body: bytes) -> tuple[str, list, object] | None:
    """(page URL, Links, Head or None) of a record of the usual shape, else None."""
    if b"\\ud" in body or b"\\uD" in body:
        return None  # surrogate escapes: json.loads keeps lone ones, which the rules count
    if body.count(b"[") + body.count(b"{") >= _MAX_BRACKETS:
        return None  # possibly nested deeper than json.loads goes (a malformed record to it)
    try:
        return _parts(_parser().parse(body))
    except RuntimeError:  # a lazy value of an earlier document still alive: never reuse then
        _local.parser = None
        return None
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _parts(doc) -> tuple[str, list, object] | None:
    # Every lazy value lives in this frame only: the parser is free again when it returns.
    if not isinstance(doc, simdjson.Object):
        return None
    envelope = doc["Envelope"]
    header, payload = envelope["WARC-Header-Metadata"], envelope["Payload-Metadata"]
    if not isinstance(header, simdjson.Object) or not isinstance(payload, simdjson.Object):
        return None
    page_url = header["WARC-Target-URI"]
    html = payload["HTTP-Response-Metadata"]["HTML-Metadata"]
    if not isinstance(page_url, str) or not isinstance(html, simdjson.Object):
        return None
    links = html["Links"]
    if not isinstance(links, simdjson.Array):
        return None
    head = _plain(html["Head"]) if "Head" in html else None
    return page_url, links.as_list(), head
