"""W3C TDMRep's site-wide file, `/.well-known/tdmrep.json`, read for every host before its images.

The file is a JSON array of rules, `{"location": PATTERN, "tdm-reservation": 0|1, "tdm-policy": URL}`.
Rules are taken in order and the first whose location matches the URL's path decides; a location
is a path pattern as in robots.txt (a prefix, `*` for any characters, a trailing `$` for the end).
No rule matching means no reservation from this file.

Fetched and cached as robots.txt is (robots.SiteFileCache: once per host for the fleet, a TTL),
with RFC 9309's handling of errors: 2xx: the rules (a body that is not such an array: no rules,
logged); 4xx: no file, no reservation; 5xx, 429, a timeout or a connection failure: unreachable,
so every URL of the host is reserved until it is asked again (ERROR_TTL_S later).
"""
from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from clipfleet.workers.download.robots_prefs import _pattern

log = logging.getLogger("clipfleet.download")

PATH = "/.well-known/tdmrep.json"


class TdmRules:
    def __init__(self, text: str):
        self.size = len(text)
        self.rules: list[tuple] = []  # (regex, reserved, policy)
        try:
            doc = json.loads(text)
        except ValueError:
            log.warning("tdmrep.json is not JSON; read as no rules")
            return
        if not isinstance(doc, list):
            log.warning("tdmrep.json is not an array of rules; read as no rules")
            return
        for rule in doc:
            if not isinstance(rule, dict) or not isinstance(rule.get("location"), str):
                continue
            location = rule["location"].strip()
            reservation = rule.get("tdm-reservation")
            if reservation in (1, "1", True):
                reserved = True
            elif reservation in (0, "0", False):
                reserved = False
            else:
                continue  # a rule without a valid reservation says nothing
            if not location.startswith("/"):
                location = "/" + location
            policy = rule.get("tdm-policy") if isinstance(rule.get("tdm-policy"), str) else None
            self.rules.append((_pattern(location), reserved, policy))

    def refusal(self, url: str) -> tuple[str, str] | None:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for regex, reserved, policy in self.rules:
            if regex.match(target):
                if not reserved:
                    return None
                more = f" (policy {policy[:200]})" if policy else ""
                return "tdmrep.json", f"reserved by {PATH} (TDMRep){more}"
        return None


def parse(text: str):
    return TdmRules(text)
