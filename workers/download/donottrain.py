"""A do-not-train list (--do-not-train): domains and URL prefixes never requested.

One entry a line, as opt-out registries export them:
- a domain (`example.com`): the host and every subdomain of it;
- a URL prefix (`https://example.com/art/`): every URL that starts with it (scheme and host
  compared without case, `http` and `https` alike).
Blank lines and `#` comments are skipped. Like the blocklist, it is applied before any request,
to redirect targets too (Fetcher's url_blocked), and a refusal is counted as "do-not-train".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from clipfleet.workers.download.blocklist import read_lines

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}\.?$")


def _host(name: str) -> str:
    name = name.strip().lower().rstrip(".")
    return name if name.isascii() else name.encode("idna").decode("ascii")


def _authority(parts) -> str:
    """The host, with the port when the URL names one (hosts on one address differ by port)."""
    port = parts.port
    return _host(parts.hostname or "") + (f":{port}" if port else "")


@dataclass(frozen=True)
class DoNotTrain:
    domains: frozenset[str] = field(default_factory=frozenset)
    prefixes: dict = field(default_factory=dict)  # host[:port] -> tuple of "path?query" prefixes

    @classmethod
    def load(cls, uri: str | None) -> "DoNotTrain":
        return cls.parse(read_lines(uri), source=uri) if uri else cls()

    @classmethod
    def parse(cls, lines, source: str = "do-not-train list") -> "DoNotTrain":
        domains, prefixes = set(), {}
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "://" in line:
                parts = urlsplit(line)
                if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                    raise ValueError(f"{source}:{number}: not an http(s) URL prefix: {line[:100]!r}")
                rest = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                prefixes.setdefault(_authority(parts), []).append(rest)
                continue
            try:
                domain = _host(line.split("#", 1)[0])
            except UnicodeError:
                domain = ""
            if not _DOMAIN.match(domain):
                raise ValueError(f"{source}:{number}: not a domain or URL prefix: {line[:100]!r}")
            domains.add(domain)
        return cls(frozenset(domains), {h: tuple(p) for h, p in prefixes.items()})

    def __bool__(self) -> bool:
        return bool(self.domains or self.prefixes)

    def listed(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
            host = _host(parts.hostname or "")
        except (ValueError, UnicodeError):
            return False
        if self.domains:
            labels = host.split(".")
            if any(".".join(labels[i:]) in self.domains for i in range(len(labels))):
                return True
        wanted = self.prefixes.get(_authority(parts)) if self.prefixes else None
        if wanted:
            rest = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            return rest.startswith(wanted)
        return False


def url_refusal(blocklist, do_not_train: DoNotTrain, honoured: bool):
    """The Fetcher's url_blocked: "do-not-train", True (blocklisted) or False."""
    def blocked(url: str):
        if honoured and do_not_train and do_not_train.listed(url):
            return "do-not-train"
        return blocklist.url_blocked(url)
    return blocked
