"""Sandbox hosts that say "not for AI training" (or "yes, train") each in one 2026 convention.

Each case is a TestHost (sandbox/hosts.py) configured one way, with what a downloader that honours
the convention for the "train-ai" purpose must do with its images: none stored from a reserving
host (and the refusal counted under `kind`), all stored from a granting or silent one. The images
live under /img/, as the sandbox world's do. Page-level metas are the extract stage's (WAT pages),
so they are laid out in `PAGE_METAS`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from clipfleet.sandbox.hosts import TestHost


@dataclass(frozen=True)
class ConsentCase:
    name: str
    convention: str          # as --respect names it
    where: str               # header, robots.txt rule, well-known file
    reserves: bool
    kind: str | None         # the refusal kind counted for each image of a reserving host
    host: dict = field(default_factory=dict)  # TestHost keyword arguments

    def start(self, root) -> TestHost:
        return TestHost(root, **self.host).start()


_ALLOW = "User-agent: *\nAllow: /\n"

CASES = (
    ConsentCase("silent", "", "nothing", False, None),
    ConsentCase("content-usage-header-n", "content-usage", "header", True, "content-usage header",
                {"headers": {"Content-Usage": "train-ai=n, search=y"}}),
    ConsentCase("content-usage-header-y", "content-usage", "header", False, None,
                {"headers": {"Content-Usage": "train-ai=y"}}),
    ConsentCase("content-usage-robots-n", "content-usage", "robots.txt rule", True, "content-usage robots.txt",
                {"robots": _ALLOW + "Content-Usage: train-ai=n\n"}),
    # aipref-attach's own example shape: no for the site, yes under a path (the images' path).
    ConsentCase("content-usage-robots-y", "content-usage", "robots.txt rule", False, None,
                {"robots": _ALLOW + "Content-Usage: train-ai=n\nContent-Usage: /img/ train-ai=y\n"}),
    ConsentCase("tdmrep-header-1", "tdmrep", "header", True, "tdmrep header",
                {"headers": {"tdm-reservation": "1", "tdm-policy": "https://rights.example/policy.json"}}),
    ConsentCase("tdmrep-header-0", "tdmrep", "header", False, None, {"headers": {"tdm-reservation": "0"}}),
    ConsentCase("tdmrep-json-1", "tdmrep", "well-known file", True, "tdmrep.json",
                {"tdmrep": json.dumps([{"location": "/img/*", "tdm-reservation": 1,
                                        "tdm-policy": "https://rights.example/policy.json"}])}),
    # first matching rule decides: /img/ is open although the site as a whole is reserved
    ConsentCase("tdmrep-json-0", "tdmrep", "well-known file", False, None,
                {"tdmrep": json.dumps([{"location": "/img/*", "tdm-reservation": 0},
                                       {"location": "/", "tdm-reservation": 1}])}),
    ConsentCase("content-signal-no", "content-signal", "robots.txt rule", True, "content-signal robots.txt",
                {"robots": "User-agent: *\nContent-Signal: search=yes, ai-train=no\nAllow: /\n"}),
    ConsentCase("content-signal-yes", "content-signal", "robots.txt rule", False, None,
                {"robots": "User-agent: *\nContent-Signal: search=yes, ai-train=yes\nAllow: /\n"}),
    ConsentCase("x-robots-tag-noai", "x-robots-tag", "header", True, "x-robots-tag",
                {"headers": {"X-Robots-Tag": "noai"}}),
    ConsentCase("robots-disallow", "robots.txt", "robots.txt rule", True, "robots.txt",
                {"robots": "User-agent: *\nDisallow: /img/\n"}),
)

# <meta> lists of WAT pages (Head.Metas) and whether the extract stage keeps the page's images.
PAGE_METAS = (
    ("tdm-reservation-1", [{"name": "tdm-reservation", "content": "1"},
                           {"name": "tdm-policy", "content": "https://rights.example/policy.json"}], False),
    ("tdm-reservation-0", [{"name": "tdm-reservation", "content": "0"}], True),
    ("robots-noai", [{"name": "robots", "content": "noai"}], False),
    ("silent", [], True),
)
