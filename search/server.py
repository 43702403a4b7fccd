"""`clipfleet serve`: the search service under uvicorn, with --workers server processes.

The parent builds the memory-mappable metadata once (search/catalog.py) and checks the index
opens, then uvicorn starts the workers; each maps the same files and loads the model once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile

from clipfleet.search.catalog import cache_dir_for, ensure_catalog
from clipfleet.search.index import open_index
from clipfleet.search.settings import ServeSettings
from clipfleet.shared.storage import Store

log = logging.getLogger("clipfleet.search")


def default_index_name(store: Store) -> str:
    name = store.uri.rstrip("/").rsplit("/", 1)[-1]
    return name or "clipfleet"


def serve(store_uri: str, settings: ServeSettings) -> int:
    import uvicorn
    store = Store(store_uri)
    cache = ensure_catalog(store, cache_dir_for(store, settings.cache_dir))
    index = open_index(store, "image", cache)
    log.info("serving %d samples of %s", index.ntotal, store.uri)
    del index
    threads = max(1, (os.cpu_count() or 1) // settings.workers)
    metrics_dir = tempfile.mkdtemp(prefix="clipfleet-search-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before any worker imports prometheus_client
    os.environ["CLIPFLEET_SEARCH_CONFIG"] = json.dumps({
        "store": store.uri, "settings": dataclasses.asdict(settings), "cache": str(cache), "threads": threads,
        "index_name": settings.index_name or default_index_name(store)})
    print(f"search: http://{settings.host}:{settings.port}/ ({settings.workers} workers)", flush=True)
    try:
        uvicorn.run("clipfleet.search.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, limit_concurrency=settings.concurrency, timeout_keep_alive=5,
                    server_header=False, proxy_headers=False, access_log=False, log_level="warning")
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
