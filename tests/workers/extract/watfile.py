"""Small WAT files written in the test, record by record, for cases the sandbox does not make."""
from __future__ import annotations

import io
import json

from warcio.warcwriter import WARCWriter


def response_record(page_url: str, links: list[dict], base: str | None = None) -> dict:
    """The JSON of a WAT metadata record that describes an HTML response."""
    head = {"Title": "a page"}
    if base is not None:
        head["Base"] = base
    return {"Envelope": {
        "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": page_url},
        "Payload-Metadata": {"HTTP-Response-Metadata": {
            "HTML-Metadata": {"Head": head, "Links": links}}}}}


def img(url: str, alt: str | None) -> dict:
    link = {"path": "IMG@/src", "url": url}
    if alt is not None:
        link["alt"] = alt
    return link


def good_page(i: int) -> dict:
    """A page with two good image links, one root-relative and one relative with "../"."""
    return response_record(f"http://example.org/gallery/{i}/page.html",
                           [img(f"/img/{i}.jpg", f"picture number {i}"), img(f"../b/{i}.png", f"other picture {i}")])


def write_wat(path, payloads: list, compress: bool = True) -> None:
    """One metadata record per payload: a dict is written as JSON, bytes as they are."""
    with open(path, "wb") as stream:
        writer = WARCWriter(stream, gzip=compress)
        for i, payload in enumerate(payloads):
            body = json.dumps(payload).encode() if isinstance(payload, dict) else payload
            record = writer.create_warc_record(
                f"http://example.org/{i}", "metadata", payload=io.BytesIO(body), length=len(body),
                warc_content_type="application/json")
            writer.write_record(record)
