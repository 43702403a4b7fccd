"""Options of the extract stage (declared once; the CLI flags come from these fields)."""
from __future__ import annotations

from dataclasses import dataclass

from clipfleet.shared.options import option


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

    def __post_init__(self):
        self.drop_extensions = tuple(e.lower() for e in self.drop_extensions)
