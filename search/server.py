"""`clipfleet serve`: the search service under uvicorn, with --workers server processes.

The parent builds the memory-mappable metadata once (search/catalog.py) and opens the index and
catalog as a worker will, so a store that cannot be served fails here with one message; then
uvicorn starts the workers, each mapping the same files and loading the model once. A worker
that cannot start (the model's weights missing, say) stops the whole server instead of being
restarted forever.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from clipfleet.search.catalog import cache_dir_for, ensure_catalog
from clipfleet.search.settings import ServeSettings
from clipfleet.shared.storage import Store

log = logging.getLogger("clipfleet.search")
ENV_FAILED = "CLIPFLEET_SEARCH_FAILED"
ENV_WORKERS = "CLIPFLEET_SEARCH_WORKERS"


class ServeError(ValueError):
    """The store cannot be served; the message says why (the CLI prints it as an error)."""


def default_index_name(store: Store) -> str:
    name = store.uri.rstrip("/").rsplit("/", 1)[-1]
    return name or "clipfleet"


def serve(store_uri: str, settings: ServeSettings) -> int:
    import uvicorn
    from clipfleet.search.engine import Engine
    from clipfleet.search.catalog import CatalogError
    from clipfleet.search.index import IndexMissing
    store = Store(store_uri)
    try:
        cache = ensure_catalog(store, cache_dir_for(store, settings.cache_dir))
        check = Engine(store, settings, load_model=False, cache=cache)
    except (CatalogError, IndexMissing) as exc:
        raise ServeError(f"cannot serve {store.uri}: {exc}") from None
    log.info("serving %d samples of %s (%s)", check.ntotal, store.uri, ", ".join(sorted(check.indices)))
    del check
    threads = max(1, (os.cpu_count() or 1) // settings.workers)
    work = Path(tempfile.mkdtemp(prefix="clipfleet-search-"))
    (work / "metrics").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(work / "metrics")  # before a worker imports prometheus_client
    os.environ[ENV_FAILED] = str(work / "failed")
    os.environ[ENV_WORKERS] = str(settings.workers)
    os.environ["CLIPFLEET_SEARCH_CONFIG"] = json.dumps({
        "store": store.uri, "settings": dataclasses.asdict(settings), "cache": str(cache), "threads": threads,
        "index_name": settings.index_name or default_index_name(store)})
    print(f"search: http://{settings.host}:{settings.port}/ ({settings.workers} workers)", flush=True)
    failed = work / "failed"
    try:
        try:
            uvicorn.run("clipfleet.search.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                        workers=settings.workers, limit_concurrency=settings.concurrency, timeout_keep_alive=5,
                        server_header=False, proxy_headers=False, access_log=False, log_level="warning")
        except SystemExit:  # uvicorn's own exit when the app of a single worker cannot be built
            if not failed.exists():
                raise
        if failed.exists():
            raise ServeError(f"a search worker could not start: {failed.read_text()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def worker_failed(message: str) -> None:
    """Called by a worker whose app cannot be built: record why, and stop the server (with one
    worker, uvicorn runs it in this process and stops by itself)."""
    import signal
    path = os.environ.get(ENV_FAILED)
    if path:
        Path(path).write_text(message)
    if os.environ.get(ENV_WORKERS, "1") != "1":
        os.kill(os.getppid(), signal.SIGTERM)
