"""The dataset card: `<store>/README.md` in the Hugging Face dataset-card format, for what is published.

YAML front matter (license, size category, two configs: `default` is dataset/*.parquet, `webdataset`
is dataset/*.tar) and prose: sources, samples through every stage, filters and thresholds as run.json
holds them, models with their files' sha256, refusals (robots.txt, opt-outs, blocklists) and takedowns.
Every count comes from the run state (shared/runstate.py, the markers), as `status` and `report`
read it, so the card says what the markers say.

Written once the run has settled (by then every marker is in the per-stage summaries): by
`clipfleet run`, or for a `--detach`ed run by the fleet's sweeper (workers/publish/__init__.py);
then by `clipfleet takedown` after each takedown, and by `clipfleet card --store S`: one read of
the run state plus the model files' hashes, so rewriting it is cheap and harmless. No stage writes
it: a card of a half-published run would say less than the next one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time

from clipfleet.shared import layout
from clipfleet.shared.runstate import RunState
from clipfleet.shared.storage import Store
from clipfleet.workers.index.takedown import read_ids, taken_down

# Hugging Face's size_categories buckets (by published samples).
SIZE_CATEGORIES = [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"),
                   (1e7, "1M<n<10M"), (1e8, "10M<n<100M"), (1e9, "100M<n<1B"), (1e10, "1B<n<10B"),
                   (1e11, "10B<n<100B"), (1e12, "100B<n<1T")]
# The option sections that decide what is kept (the rest say how fast or where).
FILTER_SECTIONS = ("extract", "download", "clip", "tag")

LICENSE = (
    "`license: other`: clipfleet publishes links to images found on the web, their alt texts, scores "
    "computed here and resized copies of the images. The images and texts belong to their authors and "
    "to the sites that published them; no license to them is granted by this dataset, and each "
    "sample's `URL` says where it came from. It is meant, as LAION-5B was, for research under the "
    "exceptions for text and data mining where they apply; what its users may do with it depends on "
    "their jurisdiction and use. Rights holders can have samples removed (see Takedowns).")


def size_category(n: int) -> str:
    return next((name for bound, name in SIZE_CATEGORIES if n < bound), "n>1T")


def published_now(store: Store, tag_out: int | None) -> int:
    """Samples in dataset/ now: what the tag markers published, less what takedowns removed and a
    refilter left out since (ids of both are the embedded samples' global ids)."""
    gone = set(taken_down(store).tolist()) | set(read_ids(store, layout.FILTERED_IDS).tolist())
    return max(0, (tag_out or 0) - len(gone))


def front_matter(name: str, published: int) -> str:
    lines = ["---", "license: other", f"pretty_name: {json.dumps(name)}", "size_categories:",
             f"- {size_category(published)}", "task_categories:", "- image-to-text", "- text-to-image",
             "tags:", "- clipfleet", "- image-text", "- common-crawl", "configs:"]
    for config, pattern in (("default", "dataset/*.parquet"), ("webdataset", "dataset/*.tar")):
        lines += [f"- config_name: {config}", "  data_files:", "  - split: train", f"    path: {pattern}"]
    return "\n".join(lines + ["---", ""])


def _n(value) -> str:
    return "–" if value is None else f"{value:,}"


def counts_table(states) -> list[str]:
    rows = ["| stage | shards done / expected | failed | samples in | samples out | dropped (top reasons) |",
            "|---|---|---|---|---|---|"]
    for s in states:
        drops = ", ".join(f"{name} {n:,}" for name, n in s.drop_reasons(top=None)) or "–"
        rows.append(f"| {s.stage} | {s.n_done} / {s.n_expected} | {s.n_failed} | {_n(s.samples_in)} | "
                    f"{_n(s.samples_out)} | {drops} |")
    return rows


def options_table(cfg) -> list[str]:
    rows = ["| stage | option | value | what it does |", "|---|---|---|---|"]
    for section in FILTER_SECTIONS:
        options = cfg.sections.get(section)
        if options is None:
            continue
        for f in dataclasses.fields(options):
            if "help" not in f.metadata:
                continue  # filled by the run, not a flag
            value = getattr(options, f.name)
            rows.append(f"| {section} | `--{f.name.replace('_', '-')}` | `{json.dumps(value, default=str)}` | "
                        f"{f.metadata['help'].replace('|', '/').replace('%%', '%')} |")
    return rows


def refusals(states) -> list[str]:
    """Every dropped count that is a refusal, an opt-out or a blocklist hit, stage by stage."""
    lines = []
    for s in states:
        for key in sorted(s.dropped):
            value = s.totals.get(key)
            if value is None or not any(w in key.lower() for w in ("refused", "opt_out", "blocklist", "robots")):
                continue
            if isinstance(value, dict):
                lines += [f"- {s.stage}, {key}: {reason} {n:,}" for reason, n in value.items()]
            else:
                lines.append(f"- {s.stage}, {key}: {value:,}")
    return lines or ["- none were counted"]


def _sha256(path) -> str:
    import fsspec
    digest = hashlib.sha256()
    with fsspec.open(str(path), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_files(name: str, cache_uri: str) -> list[tuple[str, str]]:
    """(file, sha256) of a model: from the model cache's manifest, else its local folder or file."""
    import os

    from clipfleet.shared.models import model_folder
    from clipfleet.shared.models.cache import read_manifest
    manifest = read_manifest(cache_uri, name)
    if manifest is not None:
        return [(f"{e['area']}/{e['path']}", e["sha256"]) for e in manifest["files"]]
    folder = model_folder(name)
    if folder is not None:
        return [(p.name, _sha256(p)) for p in sorted(folder.iterdir()) if p.is_file()]
    path = name.split(":", 1)[-1] if ":" in name else name.split("/", 1)[-1]
    if "://" in path or os.path.isfile(path):
        try:
            return [(path, _sha256(path))]
        except (FileNotFoundError, OSError):
            pass
    return []


def models(cfg, store: Store) -> list[str]:
    from clipfleet.shared.models.cache import cache_uri_of
    cache = cache_uri_of(store.uri)
    named = []
    if "clip" in cfg.stages:
        named += [("clip model", cfg.clip.filter_model),
                  ("clip multilingual model", cfg.clip.multilingual_filter_model)]
    if "embed" in cfg.stages:
        named.append(("embed model", cfg.embed.embed_model))
    if "tag" in cfg.stages:
        tag = cfg.tag
        named += [(f"tag head {column}", getattr(tag, f"{column}_head"))
                  for column in ("punsafe", "pwatermark", "aesthetic")]
        named += [("tag head", spec) for spec in tag.tag_heads]
    lines, roles = [], {}
    for role, name in named:  # a model that plays several roles is listed once
        roles.setdefault(name, []).append(role)
    for name, its in roles.items():
        if name in ("auto", "none", ""):
            lines += [f"- {role}: `{name}` (" + (f"the head shipped with {cfg.embed.embed_model})" if name == "auto"
                                                 else "no head: a null column)") for role in its]
            continue
        files = model_files(name, cache)
        lines.append(f"- {', '.join(its)}: `{name}`" + ("" if files else " (no file to hash on this machine)"))
        lines += [f"  - `{path}` sha256 `{digest}`" for path, digest in files]
    return lines


def takedowns(store: Store) -> list[str]:
    records = [n for n in store.list(layout.TAKEDOWNS) if n.endswith(".json")]
    lines = []
    for name in records:
        record = store.read_json(f"{layout.TAKEDOWNS}/{name}")
        at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(record.get("at", 0)))
        lines.append(f"- {at}: {len(record.get('removed', []))} samples matched "
                     f"({record.get('already_removed', 0)} of them removed before), reason: "
                     f"{record.get('reason') or 'none given'}")
    return lines or ["- none"]


def build_card(store: Store) -> str | None:
    """The card's text; None while nothing is published (no tag shard done)."""
    run = RunState(store)
    cfg = run.cfg
    states = run.all()
    by_stage = {s.stage: s for s in states}
    tag = by_stage.get("tag")
    if tag is None or not tag.n_done:
        return None
    published = published_now(store, tag.samples_out if tag else None)
    name = store.uri.rstrip("/").rsplit("/", 1)[-1]
    inputs = ", ".join(f"`{i}`" for i in cfg.inputs[:5]) + (f" and {len(cfg.inputs) - 5:,} more"
                                                             if len(cfg.inputs) > 5 else "")
    removed = len(taken_down(store))
    left_out = len(read_ids(store, layout.FILTERED_IDS))
    parts = [
        front_matter(name, published),
        f"# {name}",
        "",
        f"An image-text dataset built by clipfleet the way LAION-5B was built: **{published:,} samples** "
        f"published in `dataset/` (LAION's columns; one parquet and one webdataset tar per shard).",
        "",
        "```python",
        "from datasets import load_dataset",
        f'rows = load_dataset("{store.uri}", split="train")            # dataset/*.parquet',
        f'tars = load_dataset("webdataset", data_files="{store.url("dataset/*.tar")}", split="train")',
        "```",
        "",
        "(`datasets` picks one loader per repository, from the first config, so the `webdataset` config is "
        "read with the webdataset loader named: huggingface/datasets#6447.)",
        "",
        "## Sources",
        "",
        f"{len(cfg.inputs):,} {cfg.input_kind} input(s): {inputs}. Run started "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(cfg.created_at))}; it went through "
        f"{', '.join(cfg.stages)}.",
        "",
        "## Samples through every stage",
        "",
        "From the run's completion markers (`_markers/`), as `clipfleet status` shows them.",
        "",
        *counts_table(states),
        "",
        f"Published by the tag stage: {_n(tag.samples_out if tag else None)}; removed by takedowns since: "
        f"{removed:,}; left out by `clipfleet refilter`: {left_out:,}; in `dataset/` now: {published:,}.",
        "",
        "## Filters and thresholds",
        "",
        *thresholds(cfg, by_stage),
        *percentile(store),
        "",
        "Every option of the stages that decide what is kept, as run.json holds it:",
        "",
        *options_table(cfg),
        "",
        "## Models",
        "",
        *models(cfg, store),
        "",
        "## Refusals and opt-outs",
        "",
        "What sites refused or opted out of (robots.txt, X-Robots-Tag, aipref, TDMRep, page metas) and "
        "what blocklists removed, counted by the markers; none of it was downloaded or published.",
        "",
        *refusals(states),
        "",
        "## Takedowns",
        "",
        *takedowns(store),
        "",
        "## License",
        "",
        LICENSE,
        "",
    ]
    return "\n".join(parts)


def thresholds(cfg, by_stage: dict) -> list[str]:
    """The CLIP thresholds in force: run.json holds the value applied, a model's calibrated one included."""
    if "clip" not in by_stage:
        return ["- no CLIP filter ran"]
    en, other = cfg.clip.min_similarity_en, cfg.clip.min_similarity_other
    return [f"- CLIP similarity, English: kept at ≥ {en} with `{cfg.clip.filter_model}`",
            f"- CLIP similarity, other languages and no language: kept at ≥ {other} with "
            f"`{cfg.clip.multilingual_filter_model}`"]


def percentile(store: Store) -> list[str]:
    """The filters `clipfleet refilter` applied (percentile per bucket, image-based), when it ran."""
    if not store.exists(layout.FILTER_RECORD):
        return []
    record, lines = store.read_json(layout.FILTER_RECORD), []
    if record["keep_top_percent"] is not None:
        lines.append(f"- then `clipfleet refilter --keep-top-percent {record['keep_top_percent']}` (DataComp's "
                     "filter): the top share by CLIP similarity, per bucket, across the whole run")
        for name, b in record["buckets"].items():
            cutoff = "" if b["min_similarity"] is None else f" (similarity ≥ {b['min_similarity']:.4f})"
            lines.append(f"  - {name}: {b['kept']:,} of {b['judged']:,} judged samples kept{cutoff}")
    near = record.get("keep_near")
    if near:
        lines += [f"- {'and ' if lines else 'then '}`clipfleet refilter --keep-near` (DataComp's image-based "
                  f"filter): the image embeddings in {near['clusters']:,} k-means clusters (seed {near['seed']}); "
                  f"the {near['clusters_kept']:,} clusters nearest to some of {near['target_vectors']:,} target "
                  f"vectors kept: {near['near']:,} of {near['embedded']:,} embedded samples",
                  f"  - targets: {', '.join(near['targets'])}"]
    return lines


def write_card(store_uri: str | Store) -> str:
    """Write `<store>/README.md` for the run there (only when something is published); its URI or ''."""
    store = store_uri if isinstance(store_uri, Store) else Store(store_uri)
    if not store.exists(layout.RUN_FILE):
        raise ValueError(f"{store.uri} holds no run (no {layout.RUN_FILE})")
    text = build_card(store)  # the run state's counts: no listing of a sealed run's markers
    if text is None:
        return ""
    store.write_bytes(layout.DATASET_CARD, text.encode())
    return store.url(layout.DATASET_CARD)


__all__ = ["build_card", "write_card", "size_category"]
