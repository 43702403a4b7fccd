"""Registering a run: run.json written once (or checked and taken further), the store checked,
the first tasks worked out, dead letters set aside for a replay."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from clipfleet.shared.layout import RUN_FILE
from clipfleet.shared.runconfig import RunConfig, option_section
from clipfleet.shared.runstate import RunState
from clipfleet.shared.storage import DEADLETTER, Store, StoreError

log = logging.getLogger("clipfleet.run")


class RunError(RuntimeError):
    """The run cannot start: conflicting store, bad inputs."""


@dataclass
class FirstTask:
    stage: str
    shard: int
    kwargs: dict


def register(store: Store, cfg: RunConfig) -> list[str]:
    """Write run.json, or check that the store holds this same run and take it further.

    A store may be taken further: `until` may change, and so may the options of stages that
    have not run yet. Anything else is a conflict, named flag by flag. Returns what changed."""
    if not store.exists(RUN_FILE):
        cfg.save(store)
        return []
    existing = RunConfig.load(store)
    RunState(store, existing).unseal()  # this command may add shards: the next look lists the markers
    cfg.created_at = existing.created_at  # the run's identity (dedup claims, the run state in Redis) stays
    cfg.versions = existing.versions
    changed = existing.differences(cfg)
    if not changed:
        return []
    ran = RunState(store, existing).stages_run()
    conflicts = [name for name in changed if not _may_change(name, ran)]
    if conflicts:
        names = ", ".join(_flag(n) for n in conflicts)
        raise RunError(f"{store.uri} holds a run with different {names} "
                       f"({'stages ' + ', '.join(ran) + ' ran' if ran else 'registered'} with the old values); "
                       "rerun with its arguments (see its run.json), change only --until or the options "
                       "of stages that have not run, or use a new --store")
    cfg.save(store, updated_at=time.time())
    log.info("taking %s further: %s changed", store.uri, ", ".join(_flag(n) for n in changed))
    return changed


def _may_change(name: str, ran: list[str]) -> bool:
    if name == "until":
        return True
    section = option_section(name.removeprefix("--").replace("-", "_")) if name.startswith("--") else None
    return section is not None and section != "input" and section not in ran


def _flag(name: str) -> str:
    return name if name.startswith("--") else f"--{name.replace('_', '-')}"


def first_tasks(store: Store, cfg: RunConfig) -> list[FirstTask]:
    """The tasks that start the run: one per WAT, or one per URL shard (written here)."""
    run = RunState(store, cfg)
    stage = run.first_stage()
    if cfg.input_kind == "wat":
        shards = range(len(cfg.inputs))
    else:
        from clipfleet.producer.urls import write_url_shards
        shards = write_url_shards(store, cfg)
    return [FirstTask(stage, shard, run.task_kwargs(stage, shard)) for shard in shards]


def replay_deadletters(store: Store, stages: list[str]) -> list[tuple[str, str]]:
    """Set aside the dead letters of `stages` so their shards run again; returns which.

    A record is kept beside, under _deadletter/<stage>/replayed/, not deleted."""
    replayed = []
    for stage in stages:
        for name in store.list(f"{DEADLETTER}/{stage}"):
            if not name.endswith(".json"):
                continue
            rel = f"{DEADLETTER}/{stage}/{name}"
            record = store.read_json(rel)
            store.write_json(f"{DEADLETTER}/{stage}/replayed/{name[:-5]}-{int(time.time())}.json", record)
            store.fs.rm(store.path(rel))
            replayed.append((stage, name[:-5]))
    return replayed


def check_store(uri: str) -> Store:
    try:
        store = Store(uri)
        store.check_writable()
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"store {uri} cannot be used: {exc}") from exc
    return store
