"""A writer for WAT files in Common Crawl's format, written with warcio.

A WAT file is a series of gzip members, one WARC/1.0 record each: first a `warcinfo`
record about the WAT file itself, then `metadata` records whose JSON payload describes
one record of the source WARC file (its warcinfo, each request, each response):

    {"Container": {"Filename": "<source>.warc.gz", "Offset": ..., ...},
     "Envelope": {"WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": ...},
                  "Payload-Metadata": {"HTTP-Response-Metadata": {
                      "HTML-Metadata": {"Head": {"Title": ..., "Base": ...},
                                        "Links": [{"path": "IMG@/src", "url": ..., "alt": ...},
                                                  {"path": "A@/href", "url": ..., "text": ...}]}}}}}

A page may ask for a malformed record instead, the way real crawls contain a few.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

from warcio.warcwriter import WARCWriter

# How a page's response record can be broken; each yields no pairs.
MALFORMED_KINDS = (
    "broken_json",  # the JSON text is cut in half
    "no_envelope",  # the top-level key is "envelope", not "Envelope"
    "no_payload_metadata",  # Envelope lacks Payload-Metadata (the links sit beside it)
    "no_warc_header_metadata",  # Envelope lacks WARC-Header-Metadata, so no page URL
    "non_utf8",  # bytes that are not UTF-8 inside an alt text
)
# A page that wants non-UTF-8 bytes puts this in an alt text; the writer swaps in the bytes.
BAD_BYTES_MARK = "\ufffdNOT-UTF8\ufffd"


@dataclass
class Page:
    """One crawled HTML page: its URL, optional <base href>, and its links in order."""
    url: str
    links: list[dict] = field(default_factory=list)  # WAT "Links" entries
    base: str | None = None
    title: str = ""
    malformed: str = ""  # "" or one of MALFORMED_KINDS
    html: bool = True  # False: a non-HTML response (robots.txt), no HTML-Metadata
    metas: list[dict] = field(default_factory=list)  # <meta name content> beyond the viewport one


def _sha1_digest(text: str) -> str:
    return "sha1:" + hashlib.sha1(text.encode()).hexdigest().upper()[:32]


class _WatWriter:
    def __init__(self, stream, wat_name: str, source_warc: str, rng: random.Random,
                 start: datetime):
        self.writer = WARCWriter(stream, gzip=True, warc_version="WARC/1.0")
        self.wat_name = wat_name
        self.source_warc = source_warc
        self.rng = rng
        self.clock = start
        self.offset = 0  # where the described record would sit in the source WARC

    def _record_id(self) -> str:
        return f"<urn:uuid:{uuid.UUID(int=self.rng.getrandbits(128), version=4)}>"

    def _date(self) -> str:
        self.clock += timedelta(seconds=self.rng.randint(1, 20))
        return self.clock.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _container(self, length: int) -> dict:
        container = {
            "Filename": self.source_warc,
            "Compressed": True,
            "Offset": str(self.offset),
            "Gzip-Metadata": {"Deflate-Length": str(length // 3), "Header-Length": "10",
                              "Footer-Length": "8", "Inflated-Length": str(length)},
        }
        self.offset += length // 3 + 18
        return container

    def _write(self, record_type: str, payload: bytes, content_type: str, headers: dict) -> None:
        headers = {"WARC-Record-ID": self._record_id(), "WARC-Date": self._date(), **headers}
        record = self.writer.create_warc_record(
            headers.pop("WARC-Target-URI", ""), record_type, payload=io.BytesIO(payload),
            length=len(payload), warc_content_type=content_type, warc_headers_dict=headers)
        self.writer.write_record(record)

    def write_warcinfo(self) -> None:
        fields = (f"Software-Info: clipfleet-sandbox\r\n"
                  f"Extracted-Date: {self.clock.strftime('%a, %d %b %Y %H:%M:%S GMT')}\r\n"
                  f"ip: 127.0.0.1\r\nhostname: sandbox\r\n"
                  f"format: WARC File Format 1.0\r\n"
                  f"conformsTo: http://bibnum.bnf.fr/WARC/WARC_ISO_28500_version1_latestdraft.pdf\r\n")
        self._write("warcinfo", fields.encode(), "application/warc-fields",
                    {"WARC-Filename": self.wat_name})

    def _write_metadata(self, target_uri: str, described: dict, payload: bytes | None = None):
        if payload is None:
            payload = json.dumps(described, ensure_ascii=False).encode("utf-8")
        headers = {"WARC-Refers-To": self._record_id(), "WARC-Target-URI": target_uri}
        self._write("metadata", payload, "application/json", headers)

    def write_source_warcinfo(self) -> None:
        """The metadata record that describes the source WARC's own warcinfo record."""
        info = {"isPartOf": "CC-MAIN-SANDBOX", "operator": "clipfleet sandbox",
                "software": "clipfleet-sandbox", "format": "WARC File Format 1.0"}
        described = {
            "Container": self._container(600),
            "Envelope": {
                "Format": "WARC",
                "WARC-Header-Length": "259",
                "Actual-Content-Length": "420",
                "WARC-Header-Metadata": {"WARC-Type": "warcinfo", "WARC-Date": self._date(),
                                         "WARC-Filename": self.source_warc,
                                         "WARC-Record-ID": self._record_id(),
                                         "Content-Type": "application/warc-fields"},
                "Block-Digest": _sha1_digest(self.source_warc),
                "Payload-Metadata": {"Actual-Content-Type": "application/warc-fields",
                                     "WARC-Info-Metadata": info},
            },
        }
        self._write_metadata(self.source_warc, described)

    def write_page(self, page: Page) -> None:
        self._write_metadata(page.url, self._request(page))
        self._write_metadata(page.url, *self._response(page))

    def _warc_header(self, page: Page, warc_type: str, content_type: str) -> dict:
        return {"WARC-Type": warc_type, "WARC-Date": self._date(),
                "WARC-Record-ID": self._record_id(), "Content-Type": content_type,
                "WARC-Target-URI": page.url, "WARC-IP-Address": "127.0.0.1"}

    def _request(self, page: Page) -> dict:
        parts = urlsplit(page.url)
        return {
            "Container": self._container(500),
            "Envelope": {
                "Format": "WARC",
                "WARC-Header-Length": "318",
                "Actual-Content-Length": "262",
                "WARC-Header-Metadata": self._warc_header(
                    page, "request", "application/http; msgtype=request"),
                "Block-Digest": _sha1_digest("request " + page.url),
                "Payload-Metadata": {
                    "Actual-Content-Type": "application/http; msgtype=request",
                    "HTTP-Request-Metadata": {
                        "Request-Message": {"Method": "GET", "Path": parts.path or "/",
                                            "Version": "HTTP/1.1"},
                        "Headers-Length": "260",
                        "Headers": {"Host": parts.netloc,
                                    "User-Agent": "CCBot/2.0 (https://commoncrawl.org/faq/)",
                                    "Accept": "text/html,application/xhtml+xml",
                                    "Accept-Encoding": "br,gzip"},
                        "Entity-Length": "0",
                        "Entity-Digest": "sha1:3I42H3S6NNFQ2MSVX7XZKYAYSCX5QBYJ",
                        "Entity-Trailing-Slop-Length": "0",
                    },
                    "Trailing-Slop-Length": "4",
                },
            },
        }

    def _response(self, page: Page) -> tuple[dict, bytes | None]:
        content_type = "text/html; charset=UTF-8" if page.html else "text/plain"
        http = {
            "Response-Message": {"Version": "HTTP/1.1", "Status": "200", "Reason": "OK"},
            "Headers-Length": "251",
            "Headers": {"Date": self.clock.strftime("%a, %d %b %Y %H:%M:%S GMT"),
                        "Server": "nginx", "Content-Type": content_type},
            "Entity-Length": str(2000 + 80 * len(page.links)),
            "Entity-Digest": _sha1_digest("entity " + page.url),
            "Entity-Trailing-Slop-Length": "0",
        }
        if page.html:
            head = {"Title": page.title,
                    "Metas": [{"name": "viewport", "content": "width=device-width"}, *page.metas],
                    "Link": [{"path": "LINK@/href", "url": "/static/site.css",
                              "rel": "stylesheet"}]}
            if page.base is not None:
                head["Base"] = page.base
            http["HTML-Metadata"] = {"Head": head, "Links": page.links}
        envelope = {
            "Format": "WARC",
            "WARC-Header-Length": "405",
            "Actual-Content-Length": http["Entity-Length"],
            "WARC-Header-Metadata": self._warc_header(
                page, "response", "application/http; msgtype=response"),
            "Block-Digest": _sha1_digest("block " + page.url),
            "Payload-Metadata": {"Actual-Content-Type": "application/http; msgtype=response",
                                 "HTTP-Response-Metadata": http,
                                 "Trailing-Slop-Length": "4"},
        }
        described = {"Container": self._container(3000), "Envelope": envelope}
        return _break(described, page.malformed)


def _break(described: dict, kind: str) -> tuple[dict, bytes | None]:
    """Apply a page's malformation: a changed structure, or raw bytes to write as they are."""
    if not kind:
        return described, None
    envelope = described["Envelope"]
    if kind == "no_envelope":
        described["envelope"] = described.pop("Envelope")
        return described, None
    if kind == "no_payload_metadata":
        envelope.update(envelope.pop("Payload-Metadata"))
        return described, None
    if kind == "no_warc_header_metadata":
        del envelope["WARC-Header-Metadata"]
        return described, None
    if kind == "broken_json":
        text = json.dumps(described, ensure_ascii=False).encode("utf-8")
        return described, text[: len(text) // 2]
    if kind == "non_utf8":
        text = json.dumps(described, ensure_ascii=False).encode("utf-8")
        mark = BAD_BYTES_MARK.encode("utf-8")
        assert mark in text, "a non_utf8 page needs an alt containing BAD_BYTES_MARK"
        return described, text.replace(mark, b"\xff\xfe\xc3(", 1)
    raise ValueError(f"unknown malformation {kind!r}")



def write_wat(path, pages: list[Page], source_warc: str, seed: int,
              start: datetime | None = None) -> None:
    """Write `pages` as one WAT file at `path` (gzip members, deterministic for a seed)."""
    rng = random.Random(seed)
    start = start or datetime(2025, 1, 1, tzinfo=timezone.utc)
    name = os.path.basename(path)
    with open(path, "wb") as stream:
        writer = _WatWriter(stream, name, source_warc, rng, start)
        writer.write_warcinfo()
        writer.write_source_warcinfo()
        for page in pages:
            writer.write_page(page)
