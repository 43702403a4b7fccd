"""What `up` and `worker` say at start-up about the models of the queues they serve.

A worker loads the models of the run it works for, which it learns from each task, so at
start-up it can only say where the models it would load stand: those of the run in `--store`
(its run.json), else the defaults. A model is ready when it is in the run's model cache (the
worker copies it once) or already on this machine; otherwise the line says how to fetch it.
An unknown model name is an error: no run could use it.
"""
from __future__ import annotations

import logging

from clipfleet.shared.models import ModelNotAvailable

log = logging.getLogger("clipfleet.models")

def queue_models(queues: list[str], store_uri: str | None) -> dict[str, list[str]]:
    """queue -> model names it loads, for the run in `store_uri` or the default options."""
    from clipfleet.producer.preflight import run_models
    from clipfleet.shared.layout import RUN_FILE
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.shared.stages import REGISTRY
    from clipfleet.shared.storage import Store
    cfg = None
    if store_uri and Store(store_uri).exists(RUN_FILE):
        cfg = RunConfig.load(Store(store_uri))
    if cfg is None:
        cfg = RunConfig.make(store=store_uri or ".")
    by_queue = {q: run_models(cfg, [s.name for s in REGISTRY if s.queue == q]) for q in queues}
    return {q: names for q, names in by_queue.items() if names}


def model_lines(queues: list[str], store_uri: str | None = None) -> list[str]:
    """One line per model of the model queues: where it stands. Raises ValueError when a
    name can never be loaded."""
    from clipfleet.shared.models.cache import cache_uri_of, read_manifest
    from clipfleet.shared.models.fetch import fetch_command, local_files, needs_fetch
    cache = cache_uri_of(store_uri) if store_uri else None
    lines = []
    for queue, names in queue_models(queues, store_uri).items():
        for name in names:
            if not needs_fetch(name):
                lines.append(f"{queue}: model {name}: local")
            elif cache and read_manifest(cache, name) is not None:
                lines.append(f"{queue}: model {name}: in the model cache {cache}")
            else:
                try:
                    local_files(name)
                    lines.append(f"{queue}: model {name}: on this machine")
                except ModelNotAvailable as exc:
                    if "has no architecture" in str(exc) or "neither a checkpoint" in str(exc):
                        raise ValueError(str(exc)) from exc
                    lines.append(f"{queue}: model {name}: not fetched yet; `clipfleet run` fetches it "
                                 f"before its first task, or `{fetch_command(name, cache or 'STORE/models')}`")
    return lines


def check_queue_models(queues: list[str], store_uri: str | None = None) -> None:
    """Print where each model of the queues stands (up and worker, at start-up)."""
    for line in model_lines(queues, store_uri):
        print(f"models: {line}", flush=True)
