"""Before `run` enqueues anything: every model and head of the stages it will run is in the
model cache (`preflight_heads` before the tag stage checks its heads, `preflight` after).

Online, a model missing from the cache (`<store>/models`) is fetched once, here, for the whole
fleet; offline (`--offline` or HF_HUB_OFFLINE=1), what this machine's Hugging Face cache holds
is put in the model cache and anything else refuses the run, one line per model, naming it
and the command that fetches it. Workers then copy from the cache and never download.
"""
from __future__ import annotations

import logging

from clipfleet.shared.models import ModelNotAvailable

log = logging.getLogger("clipfleet.preflight")


class PreflightError(ValueError):
    """Models a run needs that cannot be had; one line per model."""


def run_models(cfg, stages) -> list[str]:
    """The model names the given stages of a run load, each once."""
    names = []
    if "clip" in stages:
        names += [cfg.clip.filter_model, cfg.clip.multilingual_filter_model]
    if "embed" in stages:
        names.append(cfg.embed.embed_model)
    return list(dict.fromkeys(names))


def preflight(cfg, stages, offline: bool | None = None, cache_uri: str | None = None) -> list[str]:
    """Make every model of `stages` available in the run's model cache; the names checked.

    Raises PreflightError naming every model that is missing and cannot be fetched."""
    from clipfleet.shared.models.cache import cache_uri_of, read_manifest
    from clipfleet.shared.models.fetch import fetch, fetch_command, is_offline, needs_fetch
    cache_uri = cache_uri or cache_uri_of(cfg.store)
    offline = is_offline(offline)
    names = run_models(cfg, stages)
    problems = []
    for name in names:
        if needs_fetch(name) and read_manifest(cache_uri, name) is not None:
            continue
        try:
            if fetch(name, cache_uri, offline=offline) is not None:
                print(f"model {name}: fetched into the model cache {cache_uri}", flush=True)
        except ModelNotAvailable as exc:
            if offline and needs_fetch(name):
                problems.append(f"model {name} is not in the model cache {cache_uri} nor on this machine, "
                                f"and this run is offline: fetch it where the hub can be reached with "
                                f"`{fetch_command(name, cache_uri)}`")
            else:
                problems.append(f"model {name} cannot be had: {exc} (then: `{fetch_command(name, cache_uri)}`)")
    if problems:
        raise PreflightError("\n".join(problems))
    return names


def preflight_heads(cfg, stages, offline: bool | None = None, cache_uri: str | None = None) -> None:
    """Before the tag stage's heads are checked: `laion:KIND` head flags become the model
    cache's file, fetched once if it is not there (offline and missing: PreflightError)."""
    from clipfleet.shared.models.cache import cache_uri_of
    from clipfleet.shared.models.fetch import is_offline
    problems = laion_heads(cfg, stages, cache_uri or cache_uri_of(cfg.store), is_offline(offline))
    if problems:
        raise PreflightError("\n".join(problems))


LAION = "laion:"
HEAD_FLAGS = ("punsafe_head", "pwatermark_head", "aesthetic_head")


def laion_heads(cfg, stages, cache_uri: str, offline: bool) -> list[str]:
    """Head flags naming `laion:KIND`: fetched once into the cache (online) and replaced by the
    cached file's spec, so run.json and every worker name the same bytes. Problems, one a line."""
    from clipfleet.shared.models.heads import HeadError
    from clipfleet.shared.models.laion_heads import cached_spec, download
    if "tag" not in stages:
        return []
    problems = []
    for flag in HEAD_FLAGS:
        spec = getattr(cfg.tag, flag)
        if not spec.startswith(LAION):
            continue
        kind = spec[len(LAION):]
        found = cached_spec(kind, cache_uri)
        if found is None and offline:
            problems.append(f"head {spec} (--{flag.replace('_', '-')}) is not in the model cache {cache_uri}, "
                            f"and this run is offline: fetch it with `clipfleet models fetch {spec} --to {cache_uri}`")
            continue
        if found is None:
            try:
                found = download(kind, cache_uri)
            except HeadError as exc:
                problems.append(f"head {spec} (--{flag.replace('_', '-')}) cannot be had: {exc}")
                continue
            print(f"head {spec}: fetched into the model cache {cache_uri}", flush=True)
        setattr(cfg.tag, flag, found)
    return problems
