"""What a stage is, declared once, and the one registry of stages in pipeline order.

A stage's package (`workers/<stage>/__init__.py`) declares its `StageSpec`; `workers/registry.py`
adds the specs in pipeline order. Everything that needs to know the stages (RunConfig and the CLI
flags, the Celery app's queues and tasks, the fleet launcher, run state, status, report) reads
`REGISTRY`; none keeps a list of its own. The spec names classes and functions as "module:attr"
strings, so reading the registry imports no stage code (a download worker never loads torch).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageSpec:
    name: str                       # marker folder, run.json section, `--until` value, task name suffix
    queue: str                      # the Celery queue its tasks go to
    stage: str                      # "module:Class" of its Stage, imported only where it runs
    options: type | None = None     # its options dataclass (run.json section and CLI flags), or None
    title: str = ""                 # heading of its flags in --help
    outputs: str = ""               # where its outputs live in the store, for status and report
    single_process: bool = False    # one worker process (a model or an index loaded once)
    starts: str | None = None       # the input kind ("wat", "urls") whose runs start here
    run_once: dict = field(default_factory=dict)   # run-once task name -> "module:Class" it triggers
    settled: str | None = None      # "module:func(store, state) -> bool": its run-once work is done

    @property
    def task_name(self) -> str:
        return f"clipfleet.{self.name}"

    def stage_class(self):
        return load(self.stage)


def load(target: str):
    """The object a "module:attr" string names."""
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


class Registry:
    """The stages in pipeline order. Built-in stages are added by workers/registry.py; a plugin
    module named in $CLIPFLEET_PLUGINS adds its own (`REGISTRY.add(SPEC, after="download")`)."""

    def __init__(self):
        self._specs: list[StageSpec] = []

    def add(self, spec: StageSpec, after: str | None = None) -> StageSpec:
        if any(s.name == spec.name for s in self._specs):
            raise ValueError(f"stage {spec.name!r} is registered twice")
        at = len(self._specs) if after is None else self.names().index(after) + 1
        self._specs.insert(at, spec)
        return spec

    def remove(self, name: str) -> None:
        self._specs = [s for s in self._specs if s.name != name]

    def __iter__(self):
        return iter(list(self._specs))

    def __getitem__(self, name: str) -> StageSpec:
        for spec in self._specs:
            if spec.name == name:
                return spec
        raise KeyError(f"no stage {name!r}; stages are: {', '.join(self.names())}")

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def names(self) -> list[str]:
        return [s.name for s in self._specs]

    def queues(self) -> dict[str, str]:
        """Stage name -> queue, in pipeline order."""
        return {s.name: s.queue for s in self._specs}

    def queue_names(self) -> list[str]:
        return list(dict.fromkeys(s.queue for s in self._specs))

    def first(self, input_kind: str) -> str:
        for spec in self._specs:
            if spec.starts == input_kind:
                return spec.name
        raise ValueError(f"no stage starts runs of {input_kind!r} inputs")

    def chain(self, input_kind: str, until: str | None = None) -> list[str]:
        """The stages a run of `input_kind` inputs passes through, up to `until` (included)."""
        names = self.names()
        start = names.index(self.first(input_kind))
        end = names.index(until) + 1 if until else len(names)
        return names[start:end]

    def next(self, name: str) -> str | None:
        names = self.names()
        i = names.index(name)
        return names[i + 1] if i + 1 < len(names) else None

    def run_once(self) -> dict[str, tuple[StageSpec, str]]:
        """Run-once task name -> (the stage whose queue and options it uses, "module:Class")."""
        return {name: (spec, target) for spec in self._specs for name, target in spec.run_once.items()}

    def sections(self) -> dict[str, type]:
        """run.json section -> options dataclass, for the stages that have options."""
        return {s.name: s.options for s in self._specs if s.options is not None}


REGISTRY = Registry()
