"""`run.json`: what a run was asked to do. Written once by the producer, read by every worker.

A run's config is its inputs plus one options dataclass per stage (each declared in its stage's
package, `workers/<stage>/options.py`); the CLI flags are generated from the same fields, so the
producer, the workers and `--help` agree on names and defaults. Option names are unique across
stages: they are the flag names, and `RunConfig.make` takes them flat.
"""
from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field

from clipfleet.shared.options import build, option
from clipfleet.shared.storage import Store
from clipfleet.workers.clip.options import ClipOptions
from clipfleet.workers.download.options import DownloadOptions
from clipfleet.workers.embed.options import EmbedOptions
from clipfleet.workers.extract.options import ExtractOptions
from clipfleet.workers.index.options import IndexOptions
from clipfleet.workers.tag.options import TagOptions

RUN_FILE = "run.json"


@dataclass
class InputOptions:
    """How inputs become shards (not a stage's own business)."""
    shard_size: int = option(10_000, "samples per shard")
    url_col: str = option("url", "with --urls: the URL column")
    caption_col: str = option("caption", "with --urls: the caption column")


# Section of run.json -> options dataclass, in pipeline order after the inputs.
SECTIONS = {"input": InputOptions, "extract": ExtractOptions, "download": DownloadOptions,
            "clip": ClipOptions, "embed": EmbedOptions, "tag": TagOptions, "index": IndexOptions}
# Sections whose options may change when a store is taken further (their stage has not run).
TITLES = {"input": "inputs", "extract": "extract (with --wat/--crawl)",
          "download": "download (img2dataset's option names)", "clip": "CLIP filter",
          "embed": "embeddings", "tag": "tagging", "index": "index"}


@dataclass
class RunConfig:
    store: str
    inputs: list[str] = field(default_factory=list)   # WAT URIs or URL parquet URIs
    input_kind: str = "wat"                           # "wat" starts at extract, "urls" at download
    until: str = "index"                              # last stage to run
    input: InputOptions = field(default_factory=InputOptions)
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    download: DownloadOptions = field(default_factory=DownloadOptions)
    clip: ClipOptions = field(default_factory=ClipOptions)
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    tag: TagOptions = field(default_factory=TagOptions)
    index: IndexOptions = field(default_factory=IndexOptions)
    created_at: float = field(default_factory=time.time)
    versions: dict = field(default_factory=dict)

    @classmethod
    def make(cls, store: str, **values) -> "RunConfig":
        """A config from flat option names (as the flags spell them), each routed to its section."""
        top = {f.name for f in dataclasses.fields(cls)} - set(SECTIONS)
        sections = {name: {} for name in SECTIONS}
        for key, value in values.items():
            if key in top:
                continue
            owner = OPTION_SECTION.get(key)
            if owner is None:
                raise TypeError(f"unknown run option {key!r}")
            sections[owner][key] = value
        return cls(store=store, **{k: v for k, v in values.items() if k in top},
                   **{name: build(SECTIONS[name], sections[name]) for name in SECTIONS})

    def section(self, name: str):
        return getattr(self, name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, store: Store) -> None:
        from clipfleet.shared import __version__
        self.versions = {"clipfleet": __version__, "python": platform.python_version()}
        store.write_json(RUN_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        plain = {k: v for k, v in raw.items() if k in known and k not in SECTIONS}
        return cls(**plain, **{name: build(SECTIONS[name], raw.get(name) or {}) for name in SECTIONS})

    @classmethod
    def load(cls, store: Store) -> "RunConfig":
        return cls.from_dict(store.read_json(RUN_FILE))

    def differences(self, other: "RunConfig") -> list[str]:
        """Flag names (or top-level fields) whose values differ, timestamps aside."""
        out = []
        for f in dataclasses.fields(self):
            if f.name in ("created_at", "versions"):
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in SECTIONS:
                out += ["--" + g.name.replace("_", "-") for g in dataclasses.fields(a)
                        if getattr(a, g.name) != getattr(b, g.name)]
            elif a != b:
                out.append(f.name)
        return out

    def same_work(self, other: "RunConfig") -> bool:
        """Two configs describe the same run when everything but timestamps matches."""
        return not self.differences(other)


OPTION_SECTION = {}
for _name, _cls in SECTIONS.items():
    for _f in dataclasses.fields(_cls):
        if _f.name in OPTION_SECTION:
            raise RuntimeError(f"option {_f.name} is declared by both {OPTION_SECTION[_f.name]} and {_name}")
        OPTION_SECTION[_f.name] = _name
