"""Usage preferences in robots.txt groups: aipref `Content-Usage` rules and `Content-Signal` lines.

Protego (robots.py) reads Allow/Disallow and skips lines it does not know, so these two are read
here from the same cached text, with RFC 9309's group rules:
- a group is one or more `User-agent` lines and the rules after them; groups naming the same
  agent are combined; an agent without a group of its own takes the `*` group(s);
- `Content-Usage: [path] preference` (draft-ietf-aipref-attach): the path is a robots.txt pattern
  (`*`, a trailing `$`); the longest matching path wins, a rule without a path matches every path
  as the shortest; rules with equally long paths combine, the most restrictive winning;
- `Content-Signal: [path] signals` (contentsignals.org), read the same way.
Preferences apply only to what Allow/Disallow let us fetch, which robots.py checks first.
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from clipfleet.workers.download.consent import signal_refusal, usage_refusal

_LINE = re.compile(r"^\s*([A-Za-z-]+)\s*:\s*(.*?)\s*$")
_KEYS = {"content-usage": "content-usage", "content-signal": "content-signal"}


def _pattern(path: str) -> re.Pattern:
    anchored = path.endswith("$")
    body = re.escape(path[:-1] if anchored else path).replace(r"\*", ".*")
    return re.compile(body + ("$" if anchored else ""))


class _Rule:
    __slots__ = ("length", "regex", "value")

    def __init__(self, path: str | None, value: str):
        self.length = len(path) if path else 0
        self.regex = _pattern(path) if path else None
        self.value = value

    def matches(self, target: str) -> bool:
        return self.regex is None or self.regex.match(target) is not None


class RobotsPrefs:
    """The Content-Usage and Content-Signal rules of one robots.txt, by group."""

    def __init__(self, text: str):
        self.groups: dict[str, dict[str, list[_Rule]]] = {}  # agent -> key -> rules
        agents: list[str] = []
        in_rules = False
        for raw in text.splitlines():
            line = raw.split("#", 1)[0]
            found = _LINE.match(line)
            if not found:
                continue
            key, value = found.group(1).lower(), found.group(2)
            if key == "user-agent":
                if in_rules:  # a user-agent line after rules starts a new group
                    agents, in_rules = [], False
                agents.append(value.strip().lower())
                continue
            if not agents:
                continue  # outside any group (RFC 9309: not a rule of any group)
            in_rules = True
            if key in _KEYS and value:
                path, rest = None, value
                if value.startswith("/"):
                    path, _, rest = value.partition(" ")
                    rest = rest.strip()
                    if not rest:
                        continue
                for agent in agents:
                    self.groups.setdefault(agent, {}).setdefault(_KEYS[key], []).append(_Rule(path, rest))

    def __bool__(self) -> bool:
        return bool(self.groups)

    def _rules(self, token: str, key: str) -> list[_Rule]:
        group = self.groups.get(token.lower())
        if group is None:
            group = self.groups.get("*", {})
        return group.get(key, [])

    def refusal(self, url: str, tokens: list[str], purpose: str, usage: bool, signal: bool
                ) -> tuple[str, str] | None:
        """(refusal kind, message) when a group we obey reserves this URL's use, else None."""
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        checks = []
        if usage:
            checks.append(("content-usage", "content-usage robots.txt", lambda v: usage_refusal(v, purpose)))
        if signal:
            checks.append(("content-signal", "content-signal robots.txt", signal_refusal))
        for key, kind, says_no in checks:
            for token in tokens:
                matching = [r for r in self._rules(token, key) if r.matches(target)]
                if not matching:
                    continue
                longest = max(r.length for r in matching)
                for rule in matching:
                    if rule.length == longest:
                        said = says_no(rule.value)
                        if said:
                            name = "Content-Usage" if key == "content-usage" else "Content-Signal"
                            return kind, f"reserved by {name} in robots.txt (for {token}): {said}"
        return None
