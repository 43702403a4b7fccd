"""The rules that turn one WAT record into image-text pairs, written once, a record and a link
at a time: which records are broken and why, and which pages opt out of AI use with a robots
meta (page_links), how an alt text becomes a caption,
how a link resolves against <base> and the page, which URLs are dropped and why
(image_pairs). Every link that does not become a pair is counted under its reason.

They are plain functions, tested without a broker (tests/workers/extract/test_rules.py).
A columnar re-implementation of these rules (pyarrow arrays) was measured at 0.99-1.26x
this path over the whole stage (`make bench`, extract) and removed: one set of rules.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Iterator
from urllib.parse import urljoin, urlparse, urlsplit

from clipfleet.workers.extract.fastjson import record_parts
from clipfleet.workers.extract.options import ExtractOptions
from clipfleet.workers.extract.wat import iter_record_payloads


def page_links(body: bytes, stats: Counter, metas: bool = True) -> tuple[str, str, list] | None:
    """(page URL, base URL for relative links, Links) of one WAT record, or None when it
    holds no HTML links; a broken record is counted under why it is broken."""
    fast = record_parts(body)
    if fast is not None:
        page_url, links, head = fast
        return _page(page_url, links, head, stats, metas) if _is_text(page_url) else _malformed(stats)
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
        return _malformed(stats)
    return _page(page_url, links, html.get("Head"), stats, metas)


def _malformed(stats: Counter) -> None:
    stats["malformed_record"] += 1
    return None


def _page(page_url: str, links: list, head, stats: Counter, metas: bool = True) -> tuple[str, str, list] | None:
    """page_links' answer once the record's page URL, Links and Head are known."""
    why = meta_opt_out(head["Metas"]) if metas and isinstance(head, dict) and head.get("Metas") else None
    if why:
        # <meta name="robots" content="noai">, <meta name="tdm-reservation" content="1"> and the
        # like: the page's images are never downloaded. Each image link is counted under its own
        # reason, as every dropped link is.
        dropped = sum(1 for link in links if isinstance(link, dict) and link.get("path") == "IMG@/src")
        stats["img_links"] += dropped
        stats[f"drop_meta_{why}"] += dropped
        return None
    base = head.get("Base") if isinstance(head, dict) else None
    base_url = page_url
    if isinstance(base, str) and base.strip():
        try:
            base_url = join_base(page_url, base.strip())  # a relative <base> is relative to the page
        except ValueError:
            pass
    return page_url, base_url, links


# Page-level opt-outs from AI use, as <meta name="robots"> (or a meta naming us, or CCBot, whose
# crawl the WAT comes from) says them; the download stage honours the same words in X-Robots-Tag.
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
OPT_OUT_META_NAMES = frozenset({"robots", "clipfleet", "ccbot"})


def meta_opt_out(metas) -> str | None:
    """The opt-out a page's WAT `Head.Metas` hold for us, if any: "robots_opt_out" (noai,
    noimageai) or "tdm_reservation" (W3C TDMRep's `<meta name="tdm-reservation" content="1">`)."""
    if not isinstance(metas, list):
        return None
    for meta in metas:
        if not isinstance(meta, dict):
            continue
        name, content = meta.get("name"), meta.get("content")
        if not isinstance(name, str) or not isinstance(content, str):
            continue
        name = name.strip().lower()
        if name in OPT_OUT_META_NAMES:
            if any(word.strip().lower() in OPT_OUT_DIRECTIVES for word in content.replace(",", " ").split()):
                return "robots_opt_out"
        elif name == "tdm-reservation" and content.strip() == "1":
            return "tdm_reservation"
    return None


# -- the links of a page

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
    if alt.isprintable():
        # Printable text holds no whitespace but the ASCII space (str.isprintable), so most alts
        # are clean already: no run of spaces, none at either end.
        if "  " not in alt and alt[:1] != " " and alt[-1:] != " ":
            return alt
    else:
        alt = _CONTROL.sub("", alt)
    return " ".join(alt.split())


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

    def resolve(self, src: str) -> str:
        head = src[:8].lower()
        if head.startswith("http://") or head.startswith("https://"):
            return src
        if not self.fast or ";" in src or not src.isprintable():
            return urljoin(self.base_url, src)
        cut = _query_or_fragment_at(src)
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


def _query_or_fragment_at(url: str) -> int:
    """Where the URL's query or fragment begins (its first "?" or "#"), or its length."""
    end = url.find("#")
    if end == -1:
        end = len(url)
    query = url.find("?", 0, end)
    return end if query == -1 else query


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
    """Whether the URL's path (not its query or fragment) ends with one of `extensions`:
    urlsplit's path. A printable ASCII http(s) URL without what urlsplit removes or checks is
    cut here, at the first "/" after its host and at its query or fragment, which is the path
    urlsplit finds, in a tenth of its ~11 us."""
    if not url.isascii() or not url.isprintable() or _SPLIT_CHANGES.search(url):
        return urlsplit(url).path.lower().endswith(extensions)
    lowered = url.lower()  # ASCII: same positions
    for extension in extensions:
        if extension in lowered:
            break
    else:
        return False  # most URLs: no extension anywhere in them, so not at the path's end
    end = _query_or_fragment_at(url)
    start = url.find("/", url.find("://") + 3, end)
    return start != -1 and lowered[start:end].endswith(extensions)


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
        if not url.isascii() and _SURROGATE.search(url):  # _is_text, inline: once a link
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


def extract_pairs(source, cfg: ExtractOptions, stats: Counter,
                  metas: bool = True) -> Iterator[tuple[str, str, str]]:
    """(url, caption, page_url) of every pair in a WAT stream, before dedup, in record order;
    `metas` False when --respect leaves page-level metas out."""
    for body in iter_record_payloads(source, stats):
        page = page_links(body, stats, metas)
        if page is None:
            continue
        page_url, base_url, links = page
        for url, caption in image_pairs(links, base_url, cfg, stats):
            yield url, caption, page_url
