"""Items that are never stored: known-bad URLs and image hashes (as Re-LAION removed hashes).

The file has one entry a line: a URL (http:// or https://), an MD5 or SHA-256 hex digest,
optionally prefixed `md5:` or `sha256:`, or a perceptual hash with the Hamming distance within
which a picture matches it, `phash:<16 hex>/<distance>` (the distance is optional); blank lines
and `#` comments are skipped. URLs are refused before any request (also as redirect targets);
md5/sha256 are checked on the downloaded bytes, before anything is decoded or written; perceptual
hashes on the decoded picture, so a re-encoded, resized or lightly cropped copy is refused too.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import fsspec

from clipfleet.workers.download.options import PHASH_DISTANCE
from clipfleet.workers.download.phash import PhashList

_HEX = re.compile(r"^[0-9a-f]+$")
_PHASH = re.compile(r"^phash:([0-9a-f]{16})(?:/(\d+))?$")


def read_lines(uri: str) -> list[str]:
    """A list file (local or any fsspec URI) as lines; the blocklist and the do-not-train list."""
    with fsspec.open(uri, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


@dataclass(frozen=True)
class Blocklist:
    urls: frozenset[str] = field(default_factory=frozenset)
    md5: frozenset[str] = field(default_factory=frozenset)
    sha256: frozenset[str] = field(default_factory=frozenset)
    phash: PhashList = field(default_factory=PhashList)

    @classmethod
    def load(cls, uri: str | None) -> "Blocklist":
        return cls.parse(read_lines(uri), source=uri) if uri else cls()

    @classmethod
    def parse(cls, lines, source: str = "blocklist") -> "Blocklist":
        urls, md5, sha256, phash = set(), set(), set(), {}
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(("http://", "https://")):  # a URL may itself contain '#'
                urls.add(_without_fragment(line))
                continue
            entry = line.split("#", 1)[0].strip().lower()
            perceptual = _PHASH.match(entry)
            if perceptual:
                phash[perceptual[1]] = int(perceptual[2] or PHASH_DISTANCE)
                continue
            kind, _, digest = entry.rpartition(":")
            lengths = {"md5": (32,), "sha256": (64,), "": (32, 64)}.get(kind, ())
            if len(digest) not in lengths or not _HEX.match(digest):
                raise ValueError(f"{source}:{number}: not a URL, MD5, SHA-256 or phash:<16 hex>/<distance>: "
                                 f"{line[:100]!r}")
            (md5 if len(digest) == 32 else sha256).add(digest)
        return cls(frozenset(urls), frozenset(md5), frozenset(sha256), PhashList(phash))

    def __bool__(self) -> bool:
        return bool(self.urls or self.md5 or self.sha256 or self.phash)

    def url_blocked(self, url: str) -> bool:
        return bool(self.urls) and _without_fragment(url) in self.urls

    def content_blocked(self, data: bytes, sha256: str) -> str | None:
        """Which hash of `data` is listed ("sha256" or "md5"), if any."""
        if sha256 in self.sha256:
            return "sha256"
        if self.md5 and hashlib.md5(data).hexdigest() in self.md5:
            return "md5"
        return None


def _without_fragment(url: str) -> str:
    return url.split("#", 1)[0]
