"""Options of the extract stage (declared once; the CLI flags come from these fields)."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from clipfleet.shared.options import option

MAX_DEDUP_NODES = 64  # claims are split in 64 digest groups (workers/extract/dedup_nodes.py)


def dedup_redis_urls(spec) -> list[str]:
    """--dedup-redis as a list of URLs; ValueError naming what is wrong."""
    urls = [u.strip() for u in (spec.split(",") if isinstance(spec, str) else spec) if u and u.strip()]
    for url in urls:
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{url!r} is not a redis://, rediss:// or unix:// URL")
    if len(set(urls)) != len(urls):
        raise ValueError("a node is listed twice")
    if len(urls) > MAX_DEDUP_NODES:
        raise ValueError(f"at most {MAX_DEDUP_NODES} nodes")
    return urls


def _check_dedup_redis(spec) -> str | None:
    try:
        dedup_redis_urls(spec)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass
class ExtractOptions:
    min_alt_length: int = option(5, "with --wat/--crawl: drop alt texts shorter than this, after normalising")
    max_alt_length: int = option(2000, "with --wat/--crawl: drop alt texts longer than this")
    max_url_length: int = option(2048, "with --wat/--crawl: drop image URLs longer than this")
    drop_extensions: tuple[str, ...] = option(
        (".svg", ".gif"), "with --wat/--crawl: drop image URLs whose path ends in these, comma list")
    # lid.176.ftz scores short English alts low (0.25-0.5); 0.3 keeps them while camera file names
    # still fall under it (measured on the sandbox's captions, see shared/language.py)
    min_language_score: float = option(
        0.3, 'with --wat/--crawl: a caption whose language scores under this gets language "" (no language)')
    dedup_by: str = option("url", "with --wat/--crawl: keep each URL once (url), or each URL+caption once "
                           "(uid, LAION-400M's way)", choices=("url", "uid"))
    # Several nodes: the order is the partition, fixed in run.json for the run's life.
    dedup_redis: tuple[str, ...] = option(
        (), "with --wat/--crawl: Redis for the fleet-wide URL claims, apart from the broker: one URL, a list "
        "of nodes the claims are partitioned over, or nodes of a Redis Cluster (found by asking them); "
        "default the broker's Redis. A password in a URL is stored in run.json (ops/dedup.md)",
        metavar="URL,URL", check=_check_dedup_redis)

    def __post_init__(self):
        self.drop_extensions = tuple(e.lower() for e in self.drop_extensions)
