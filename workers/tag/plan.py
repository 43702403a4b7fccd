"""Which head fills which column of a run, decided once from its config and checked before any
shard runs: `plan_run` is called by `clipfleet run` before run.json is written, and again by
the stage in each worker (the same answer, since it depends on the config alone)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from clipfleet.shared.layout import DATASET_COLUMNS
from clipfleet.shared.models.heads import Head, HeadError, embedding_dim, load_head, shipped_head_spec

# LAION's columns, and the shipped `shapes` head that stands in for each.
COLUMNS = {"punsafe": ("punsafe_head", "unsafe"), "pwatermark": ("pwatermark_head", "watermark"),
           "aesthetic": ("aesthetic_head", "aesthetic")}
RESERVED = {*DATASET_COLUMNS, *COLUMNS}  # the published columns: a user's head may not take one
LAION_HINTS = {"punsafe": "nsfw-l14:FILE or nsfw-b32:FILE", "pwatermark": "watermark-effnet:FILE",
               "aesthetic": "aesthetic-l14:FILE"}


@dataclass
class Plan:
    specs: dict[str, str]          # column -> head spec ("" for a null column), LAION's first
    null_columns: dict[str, str]   # column -> why it is null
    heads: dict[str, Head]         # column -> loaded head (columns with a spec only)


def resolve(cfg) -> tuple[dict[str, str], dict[str, str]]:
    """(column -> spec, column -> why null) for LAION's three columns; "auto" becomes the head
    shipped with the embedding model, or a null column that says what to pass instead."""
    specs, why = {}, {}
    model = cfg.embed.embed_model
    for column, (flag, shipped_tag) in COLUMNS.items():
        spec = getattr(cfg.tag, flag)
        flag_name = "--" + flag.replace("_", "-")
        if spec == "auto":
            spec = shipped_head_spec(model, shipped_tag) or ""
            if not spec:
                why[column] = (f"no {column} head ships for --embed-model {model}; pass {flag_name} "
                               f"{LAION_HINTS[column]} (LAION's released weights, see README \"Tag heads\") "
                               f"or mlp:FILE from clipfleet train-head")
        elif spec in ("none", ""):
            spec = ""
            why[column] = cfg.tag.null_columns.get(column) or f"{flag_name} none"
        specs[column] = spec
    return specs, why


def plan_run(cfg, device: str | None = None) -> Plan:
    """Resolve and load every head; refuse heads that do not fit the run's embeddings."""
    specs, why = resolve(cfg)
    heads = {column: load_head(spec, device) for column, spec in specs.items() if spec}
    for spec in cfg.tag.tag_heads:
        head = load_head(spec if spec.startswith("mlp:") else f"mlp:{spec}", device)
        column = str(head.info.get("tag") or "")
        if not column:
            raise HeadError(f"--tag-heads {spec}: the head has no tag name; train it with "
                            f"clipfleet train-head --tag NAME")
        if not column.isidentifier() or column in RESERVED or column in heads:
            raise HeadError(f"--tag-heads {spec}: column name {column!r} is taken or not a plain name")
        heads[column] = head
        specs[column] = head.spec
    dim = embedding_dim(cfg.embed.embed_model) if heads else None  # open_clip's import costs seconds
    for column, head in heads.items():
        if head.input == "image_embedding" and dim is not None and head.dim != dim:
            raise HeadError(f"the {column} head {head.spec} takes {head.dim}-d embeddings, but "
                            f"--embed-model {cfg.embed.embed_model} makes {dim}-d ones: use a head "
                            f"trained on that model's embeddings")
    return Plan(specs, why, heads)


def prepare(cfg) -> None:
    """Before run.json is written: fix every column's head and say why each null one is null,
    and fail now, naming the head, when one cannot be used."""
    for column, (flag, _) in COLUMNS.items():
        setattr(cfg.tag, flag, _absolute(getattr(cfg.tag, flag)))
    cfg.tag.tag_heads = tuple(_absolute(spec) for spec in cfg.tag.tag_heads)
    plan = plan_run(cfg, device="cpu")
    for column, (flag, _) in COLUMNS.items():
        setattr(cfg.tag, flag, plan.specs[column] or "none")
    cfg.tag.null_columns = dict(plan.null_columns)


def _absolute(spec: str) -> str:
    """A head file named relative to here, made absolute: workers may run in another directory."""
    if spec in ("auto", "none", "") or spec.startswith("shapes:"):
        return spec
    arch, sep, path = spec.partition(":")
    if not sep or "/" in arch:
        return os.path.abspath(spec)
    return spec if "://" in path else f"{arch}:{os.path.abspath(path)}"
