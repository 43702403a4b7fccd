"""Where WAT inputs come from: local paths, https:// or s3:// URIs, or a crawl's listing."""
from __future__ import annotations

import glob
import gzip
import os
import random
import re

import fsspec

from clipfleet.shared.storage import s3_options_from_env

CC_BASE = "https://data.commoncrawl.org"
CRAWL_ID = re.compile(r"CC-MAIN-\d{4}-\d{2}")
REMOTE = ("http", "https", "s3")


def _options(uri: str) -> dict:
    return s3_options_from_env() if fsspec.utils.get_protocol(uri) == "s3" else {}


def wat_inputs(specs: list[str]) -> list[str]:
    """One URI per WAT, in the order given (a glob expands sorted), each once.

    Local paths become absolute, since workers may run elsewhere than this shell; a local
    path that names no file is an error now rather than a failed task later.
    """
    found: list[str] = []
    for spec in specs:
        protocol = fsspec.utils.get_protocol(spec)
        if protocol == "s3" and glob.has_magic(spec):
            fs = fsspec.filesystem("s3", **s3_options_from_env())
            matches = [f"s3://{p}" for p in sorted(fs.glob(spec))]
            if not matches:
                raise ValueError(f"no WAT files match {spec}")
            found += matches
        elif protocol in REMOTE:
            found.append(spec)
        elif protocol in ("file", "local"):
            path = os.path.expanduser(spec.removeprefix("file://"))
            if glob.has_magic(path):
                matches = sorted(p for p in glob.glob(path) if os.path.isfile(p))
                if not matches:
                    raise ValueError(f"no WAT files match {spec}")
            elif not os.path.isfile(path):
                raise ValueError(f"WAT file not found: {spec}")
            else:
                matches = [path]
            found += [os.path.abspath(p) for p in matches]
        else:
            raise ValueError(f"cannot read WAT files from {spec}: use a local path, https:// or s3://")
    return list(dict.fromkeys(found))


def cc_base() -> str:
    """Common Crawl's base URL; tests point CLIPFLEET_CC_BASE at a local server."""
    return os.environ.get("CLIPFLEET_CC_BASE", CC_BASE).rstrip("/")


def unreachable_check(url: str) -> None:
    """Raise, in one line, when the server of an http(s) `url` cannot be reached at all."""
    if fsspec.utils.get_protocol(url) not in ("http", "https"):
        return
    import requests
    try:
        requests.head(url, timeout=20, allow_redirects=False)
    except requests.RequestException as exc:
        # urllib3 nests the cause ("[Errno 111] Connection refused") deep in its message.
        cause = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
        reason = cause.group(1).strip() if cause else exc.__class__.__name__
        raise ValueError(f"Common Crawl cannot be reached at {cc_base()} ({reason}); check this "
                         f"machine's network or proxy, or set CLIPFLEET_CC_BASE to a mirror") from None


def crawl_listing(crawl: str) -> list[str]:
    """The WAT paths of a crawl, from its `wat.paths.gz`, in listing order."""
    if not CRAWL_ID.fullmatch(crawl):
        raise ValueError(f"{crawl!r} is not a crawl id like CC-MAIN-2024-10")
    url = f"{cc_base()}/crawl-data/{crawl}/wat.paths.gz"
    try:
        with fsspec.open(url, "rb", **_options(url)) as f:
            text = gzip.decompress(f.read()).decode("utf-8")
    except FileNotFoundError as exc:
        unreachable_check(url)  # fsspec's HTTP reads a refused connection as a missing file
        raise ValueError(f"no WAT listing for {crawl} at {url}") from exc
    except (OSError, EOFError) as exc:
        unreachable_check(url)
        raise ValueError(f"cannot read the WAT listing of {crawl} at {url}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def crawl_inputs(crawl: str, count: int, seed: int | None = None) -> list[str]:
    """Full URIs of `count` WAT segments of `crawl`: the first ones, or a sample drawn with
    `seed` (kept in listing order, so the same seed always names the same segments)."""
    if count < 1:
        raise ValueError("--wat-count must be at least 1")
    paths = crawl_listing(crawl)
    if count > len(paths):
        raise ValueError(f"{crawl} has {len(paths)} WAT segments; --wat-count {count} is more")
    if seed is None:
        chosen = paths[:count]
    else:
        chosen = [paths[i] for i in sorted(random.Random(seed).sample(range(len(paths)), count))]
    return [f"{cc_base()}/{p.lstrip('/')}" for p in chosen]
