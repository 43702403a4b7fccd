"""Which opt-out conventions a run honours (`--respect`), and the per-response ones (headers).

Honoured by default, for the "train-ai" purpose (a training set):
- robots.txt: Allow/Disallow (RFC 9309), robots.py;
- x-robots-tag: `X-Robots-Tag: noai / noimageai`, read with the headers (fetch.py);
- content-usage: IETF aipref (draft-ietf-aipref-vocab, -attach), the `Content-Usage` header here
  and `Content-Usage` rules in robots.txt groups (robots_prefs.py);
- tdmrep: W3C TDMRep, the `tdm-reservation` header here, `/.well-known/tdmrep.json` (tdmrep.py)
  and `<meta name="tdm-reservation">` at extract;
- content-signal: `Content-Signal` lines in robots.txt groups (robots_prefs.py);
- page-meta: `<meta name="robots" content="noai">` and tdm-reservation metas, at extract;
- do-not-train: the --do-not-train list, before any request (donottrain.py).

Header rules are checked when the headers arrive, so a refused body is never read.
"""
from __future__ import annotations

import logging

import http_sfv

log = logging.getLogger("clipfleet.download")

CONVENTIONS = ("robots.txt", "x-robots-tag", "content-usage", "tdmrep", "content-signal", "page-meta",
               "do-not-train")
# Usage categories (aipref's vocabulary) a run may say its output is for. A training set is for
# "train-ai"; the list is where a later category would go.
PURPOSES = ("train-ai",)
DEFAULT_RESPECT = ["all", "train-ai"]

# Refusal kinds (SampleResult.refused, the `refused` stats group) -> the convention that made them.
_KIND_CONVENTION = {
    "robots.txt": "robots.txt", "robots.txt unreachable": "robots.txt",
    "x-robots-tag": "x-robots-tag",
    "content-usage header": "content-usage", "content-usage robots.txt": "content-usage",
    "tdmrep header": "tdmrep", "tdmrep.json": "tdmrep", "tdmrep.json unreachable": "tdmrep",
    "content-signal robots.txt": "content-signal",
    "do-not-train": "do-not-train",
}


def convention_of(kind: str) -> str | None:
    """The convention behind a refusal kind; None for refusals that are no opt-out (a blocklist,
    a private address)."""
    return _KIND_CONVENTION.get(kind)


def parse_respect(items) -> tuple[frozenset[str], str]:
    """(conventions honoured, purpose) from --respect's items; ValueError names a bad one."""
    conventions, purposes = set(), []
    for item in items:
        word = item.strip().lower()
        if word == "all":
            conventions.update(CONVENTIONS)
        elif word in CONVENTIONS:
            conventions.add(word)
        elif word in PURPOSES:
            purposes.append(word)
        elif word:
            raise ValueError(f"--respect: {item!r} is neither a convention ({', '.join(CONVENTIONS)}, all) "
                             f"nor a usage category ({', '.join(PURPOSES)})")
    if len(set(purposes)) > 1:
        raise ValueError(f"--respect: one usage category, got {', '.join(purposes)}")
    return frozenset(conventions), (purposes[0] if purposes else PURPOSES[0])


def check_respect(items) -> str | None:
    try:
        parse_respect(items)
    except ValueError as exc:
        return str(exc).removeprefix("--respect: ")
    return None


def turned_off(opts) -> list[str]:
    """The conventions this run does not honour, whichever option turned each off."""
    honoured, _ = parse_respect(opts.respect)
    off = {c for c in CONVENTIONS if c not in honoured}
    if not opts.disallowed_header_directives:
        off.add("x-robots-tag")
    listed = [c for c in CONVENTIONS if c in off]
    if opts.ignore_robots_txt:  # the file is not fetched: nothing in it is read
        listed += [c for c in ("robots.txt", "content-signal") if c not in off]
        if "content-usage" not in off:
            listed.append("content-usage (robots.txt rules)")
    return listed


def warning_text(off: list[str]) -> str:
    return (f"opt-outs NOT honoured in this run (--respect / --ignore-robots-txt): {', '.join(off)}; "
            "site owners who reserved AI training that way will have their images stored")


# -- the vocabularies

def _dictionary(value: str | bytes) -> dict | None:
    """A Structured Fields dictionary (RFC 8941) as {key: token or bool}; None when it does not parse
    (aipref-vocab: an expression that fails to parse states no preference)."""
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    parsed = http_sfv.Dictionary()
    try:
        parsed.parse(raw.strip())
    except Exception:  # noqa: BLE001 (http_sfv raises ValueError and others on junk from the web)
        return None
    return {key: getattr(member, "value", member) for key, member in parsed.items()}


def usage_refusal(value: str | bytes, purpose: str = "train-ai") -> str | None:
    """The aipref preference that says no to `purpose`, e.g. "train-ai=n", else None.

    train-ai is asked first; without it, its parent `bots` of the earlier vocabulary drafts.
    `train-genai=n` (an earlier draft's sub-category) also refuses: image-text training sets are
    used to train generative models, and the stricter reading is the safe one."""
    prefs = _dictionary(value)
    if not prefs:
        return None
    said = {key: str(val) for key, val in prefs.items() if isinstance(val, http_sfv.Token) and val in ("y", "n")}
    order = [purpose, "bots"] if purpose == "train-ai" else [purpose]
    for key in order:
        if key in said:
            if said[key] == "n":
                return f"{key}=n"
            break
    if said.get("train-genai") == "n":
        return "train-genai=n"
    return None


def signal_refusal(value: str | bytes) -> str | None:
    """Content-Signal (contentsignals.org): `ai-train=no` refuses training use."""
    prefs = _dictionary(value)
    if prefs and isinstance(prefs.get("ai-train"), http_sfv.Token) and prefs["ai-train"] == "no":
        return "ai-train=no"
    return None


def tdm_reserved(value: str) -> bool | None:
    """TDMRep's tdm-reservation value: 1 reserved, 0 not; anything else says nothing."""
    value = value.strip()
    return True if value == "1" else False if value == "0" else None


class HeaderRules:
    """The per-response conventions a run honours, checked on a 200's headers."""

    def __init__(self, opts):
        self.honoured, self.purpose = parse_respect(opts.respect)
        self.usage = "content-usage" in self.honoured
        self.tdm = "tdmrep" in self.honoured

    def refusal(self, response) -> tuple[str, str] | None:
        """(refusal kind, message) when a header reserves this use, else None."""
        if self.usage:
            for value in response.header_values("Content-Usage"):
                said = usage_refusal(value, self.purpose)
                if said:
                    return "content-usage header", f"reserved by Content-Usage header: {said}"
        if self.tdm:
            for value in response.header_values("tdm-reservation"):
                if tdm_reserved(value):
                    policy = response.header("tdm-policy")
                    more = f" (policy {policy[:200]})" if policy else ""
                    return "tdmrep header", f"reserved by tdm-reservation header (TDMRep){more}"
        return None


def by_convention(refused: dict) -> dict[str, int]:
    """The `refused` counts of a shard regrouped under the convention that made each refusal."""
    out: dict[str, int] = {}
    for kind, n in refused.items():
        convention = convention_of(kind)
        if convention:
            out[convention] = out.get(convention, 0) + n
    return dict(sorted(out.items()))


WARNED_TTL_S = 30 * 24 * 3600


def warn_once_per_run(redis_client, run_id: str, what: str, text: str) -> bool:
    """Log `text` once for the whole fleet and run (a Redis flag), or once per process without Redis."""
    key = f"clipfleet:warned:{run_id}:{what}"
    if redis_client is not None:
        try:
            if not redis_client.set(key, b"1", nx=True, ex=WARNED_TTL_S):
                return False
        except Exception:  # noqa: BLE001 (a warning must never cost the shard; say it here then)
            pass
    elif key in _WARNED:
        return False
    _WARNED.add(key)
    log.warning("%s", text)
    return True


_WARNED: set[str] = set()


def run_warnings(opts, redis_client, run_id: str) -> None:
    """What a run must be told once: conventions turned off, no contact against public hosts."""
    if opts.not_honoured:
        warn_once_per_run(redis_client, run_id, "respect", warning_text(opts.not_honoured))
    if not opts.contact and not opts.allow_private_addresses:
        warn_once_per_run(redis_client, run_id, "contact",
                          "no --contact: site owners cannot reach whoever runs this crawl; give a URL or "
                          "e-mail address (it goes into the user agent)")
