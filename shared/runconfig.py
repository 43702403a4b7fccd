"""`run.json`: what a run was asked to do. Written once by the producer, read by every worker.

A run's config is its inputs plus one options section per stage. The sections come from the stage
registry (shared/stages.py; each stage declares its options dataclass in its spec), so the
producer, the workers and `--help` agree on names and defaults, and this module names no stage.
Option names are unique across stages: they are the flag names, and `RunConfig.make` takes them flat.
"""
from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field

from clipfleet.shared.layout import RUN_FILE
from clipfleet.shared.options import build, option
from clipfleet.shared.stages import REGISTRY
from clipfleet.shared.storage import Store

INPUT_KINDS = ("wat", "urls")


@dataclass
class InputOptions:
    """How inputs become shards (not a stage's own business)."""
    shard_size: int = option(10_000, "samples per shard")
    url_col: str = option("url", "with --urls: the URL column")
    caption_col: str = option("caption", "with --urls: the caption column")


def sections() -> dict[str, type]:
    """run.json section -> options dataclass: the inputs, then every registered stage's."""
    if not REGISTRY.names():
        raise RuntimeError("no stages are registered: import clipfleet.workers (workers/registry.py)")
    return {"input": InputOptions, **REGISTRY.sections()}


def titles() -> dict[str, str]:
    return {"input": "inputs", **{s.name: s.title or s.name for s in REGISTRY if s.options is not None}}


def option_section(name: str) -> str | None:
    """The section that declares option `name` (flag spelling with underscores)."""
    for section, cls in sections().items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            return section
    return None


TOP_FIELDS = ("store", "inputs", "input_kind", "until", "created_at", "versions")


@dataclass
class RunConfig:
    store: str
    inputs: list[str] = field(default_factory=list)   # WAT URIs or URL parquet URIs
    input_kind: str = "wat"                           # the registry says which stage starts each kind
    until: str = ""                                   # last stage to run ("": the last registered)
    sections: dict = field(default_factory=dict)      # section name -> options instance
    created_at: float = field(default_factory=time.time)
    versions: dict = field(default_factory=dict)

    def __post_init__(self):
        declared = sections()
        self.sections = {name: self.sections.get(name) or cls() for name, cls in declared.items()}
        self.until = self.until or REGISTRY.names()[-1]

    def __getattr__(self, name: str):
        # cfg.download, cfg.clip, …: a section by its stage's name
        sections_ = self.__dict__.get("sections")
        if sections_ is not None and name in sections_:
            return sections_[name]
        raise AttributeError(name)

    @property
    def stages(self) -> list[str]:
        """The stages this run passes through, from its first to `until`."""
        return REGISTRY.chain(self.input_kind, self.until)

    @classmethod
    def make(cls, store: str, **values) -> "RunConfig":
        """A config from flat option names (as the flags spell them), each routed to its section."""
        declared = sections()
        given = {name: {} for name in declared}
        top = {}
        for key, value in values.items():
            if key in TOP_FIELDS:
                top[key] = value
                continue
            owner = option_section(key)
            if owner is None:
                raise TypeError(f"unknown run option {key!r}")
            given[owner][key] = value
        return cls(store=store, **{k: v for k, v in top.items() if k != "store"},
                   sections={name: build(declared[name], given[name]) for name in declared})

    def section(self, name: str):
        return self.sections[name]

    def to_dict(self) -> dict:
        out = {name: getattr(self, name) for name in TOP_FIELDS}
        out.update({name: dataclasses.asdict(opts) for name, opts in self.sections.items()})
        return out

    def save(self, store: Store, **extra) -> None:
        from clipfleet.shared import __version__
        self.versions = self.versions or {"clipfleet": __version__, "python": platform.python_version()}
        store.write_json(RUN_FILE, {**self.to_dict(), **extra}, strict=True)

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        declared = sections()
        plain = {k: raw[k] for k in TOP_FIELDS if k in raw}
        return cls(**plain, sections={name: build(c, raw.get(name) or {}) for name, c in declared.items()})

    @classmethod
    def load(cls, store: Store) -> "RunConfig":
        return cls.from_dict(store.read_json(RUN_FILE))

    def differences(self, other: "RunConfig") -> list[str]:
        """Flag names (or top-level fields) whose values differ, timestamps aside."""
        out = [name for name in TOP_FIELDS
               if name not in ("created_at", "versions") and getattr(self, name) != getattr(other, name)]
        for name, a in self.sections.items():
            b = other.sections[name]
            out += ["--" + g.name.replace("_", "-") for g in dataclasses.fields(a)
                    if getattr(a, g.name) != getattr(b, g.name)]
        return out

    def same_work(self, other: "RunConfig") -> bool:
        """Two configs describe the same run when everything but timestamps matches."""
        return not self.differences(other)


def revision(raw: dict) -> float:
    """Which revision of a run a run.json holds: a store reused for a new run has a new created_at,
    a run taken further with a later --until a new updated_at."""
    return raw.get("updated_at", raw["created_at"])
