"""The search service: clip back's API (as ClipClient and clip front call it), the web UI, health,
Prometheus metrics and an OpenAPI document (/openapi.json). No endpoint changes anything.

Every bad request is a 400 with {"error": message}: validation errors, unknown indices,
undecodable images, unreachable image URLs. Fields a run cannot honour are accepted and named
in the X-Clipfleet-Not-Honoured header (exposed to browsers through CORS).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from clipfleet.search import metrics
from clipfleet.search.api import ExportQuery, KnnQuery, MetadataQuery
from clipfleet.search.encoder import QueryError
from clipfleet.search.engine import SAFETY_THRESHOLD, Engine, Filters

log = logging.getLogger("clipfleet.search")
STATIC = Path(__file__).parent / "static"
ENV_CONFIG = "CLIPFLEET_SEARCH_CONFIG"
NOT_HONOURED = "X-Clipfleet-Not-Honoured"
DEPTH = "X-Clipfleet-Search-Depth"
ENDPOINTS = {"/knn-service", "/metadata", "/indices-list", "/health", "/metrics", "/export", "/",
             "/openapi.json"}
JSON_POSTS = {"/knn-service", "/metadata", "/export"}


def _error(message: str, status: int = 400, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class Guard:
    """Outermost ASGI layer: bounds request bodies, reads clip clients' bodies as JSON whatever
    their content type (ClipClient sends none, clip front text/plain), and times every request."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else ("/static" if path.startswith("/static/") else "other")
        started, status = time.perf_counter(), [500]

        async def send_timed(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            length = headers.get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.max_body:
                return await self._reject(send_timed, length)
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > self.max_body:
                    return await self._reject(send_timed, str(size).encode())
            body = b"".join(chunks)
            if scope["method"] == "POST" and path in JSON_POSTS:
                kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
                if kind in (b"", b"text/plain", b"application/x-www-form-urlencoded"):
                    headers[b"content-type"] = b"application/json"
                    scope = {**scope, "headers": list(headers.items())}
            sent = [False]

            async def replay():
                if not sent[0]:
                    sent[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_timed)
        finally:
            metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)
            metrics.REQUESTS.labels(endpoint, str(status[0])).inc()

    async def _reject(self, send, length: bytes):
        body = json.dumps({"error": f"request body too large or malformed length ({length.decode(errors='replace')} "
                                    f"bytes; at most {self.max_body})"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def build_app(engine: Engine, index_name: str) -> FastAPI:
    settings = engine.settings

    # No /docs: its page loads scripts from a CDN, and a search server may have no internet.
    app = FastAPI(title="clipfleet search", version="1", docs_url=None, redoc_url=None,
                  description="clip-retrieval's clip back API over a clipfleet run: ClipClient and clip front "
                              "work against it as they are.")
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["*"],
                       expose_headers=[NOT_HONOURED, DEPTH])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg')}")
        return _error("; ".join(problems)[:2000] or "invalid request")

    @app.exception_handler(QueryError)
    async def _bad_query(_request: Request, exc: QueryError):
        return _error(str(exc))

    def check_index(name: str | None) -> None:
        if name not in (None, index_name):
            raise QueryError(f"unknown index {name!r}; this service has: {index_name}")

    @app.get("/", include_in_schema=False)
    def ui():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/indices-list", summary="the names of the indices served")
    def indices_list() -> list[str]:
        return [index_name]

    @app.get("/health", summary="200 when the index, metadata and model are loaded")
    def health() -> dict:
        return {"status": "ok", "indices": [index_name], "ntotal": engine.ntotal,
                "modalities": sorted(engine.indices), "model": engine.model_name}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus():
        data, kind = metrics.exposition()
        return Response(data, media_type=kind)

    @app.post("/knn-service", summary="nearest neighbours of a text, image, image URL or embedding",
              response_model=None, responses={
                  200: {"description": "results, best first: the first num_images with metadata",
                        "content": {"application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}},
                  400: {"description": "a request the service cannot answer, with a message"}})
    def knn_service(query: KnnQuery):
        check_index(query.indice_name)
        deadline = time.monotonic() + settings.query_timeout
        notes: dict = {}
        num_images = query.num_images or 40
        num_ids = max(query.num_result_ids or num_images, num_images)
        if num_images > settings.max_num_images:
            notes["num_images"] = f"lowered from {num_images} to {settings.max_num_images}"
            num_images = settings.max_num_images
        if num_ids > settings.max_num_result_ids:
            notes["num_result_ids"] = f"lowered from {num_ids} to {settings.max_num_result_ids}"
            num_ids = settings.max_num_result_ids
        if query.use_mclip:
            notes["use_mclip"] = f"queries are embedded with the run's model, {engine.model_name}"
        with metrics.STEP_SECONDS.labels("embed").time():
            vector = engine.embed(text=query.text, image=query.image, image_url=query.image_url,
                                  embedding=query.embedding_input, similar_to=query.similar_to)
        vector = engine.reweight(vector, query.aesthetic_score, query.aesthetic_weight, notes)
        max_punsafe = query.max_punsafe
        if query.use_safety_model:
            max_punsafe = SAFETY_THRESHOLD if max_punsafe is None else min(max_punsafe, SAFETY_THRESHOLD)
        filters = Filters(deduplicate=bool(query.deduplicate), max_punsafe=max_punsafe,
                          max_pwatermark=query.max_pwatermark, min_aesthetic=query.min_aesthetic,
                          languages=tuple(query.language) if query.language else None,
                          violence=bool(query.use_violence_detector))
        with metrics.STEP_SECONDS.labels("search").time():
            outcome = engine.search(vector, num_ids, modality=query.modality or "image", filters=filters,
                                    deadline=deadline)
        notes.update(outcome.notes)
        with metrics.STEP_SECONDS.labels("metadata").time():
            metas = engine.metadata(outcome.ids[:num_images])
        results = []
        for i, (gid, sim) in enumerate(zip(outcome.ids.tolist(), outcome.sims.tolist())):
            row = dict(metas[i] or {}) if i < num_images else {}
            row["id"], row["similarity"] = gid, sim
            results.append(row)
        metrics.RESULTS.observe(len(results))
        metrics.DEPTH.observe(outcome.depth)
        metrics.DEPTH_RATIO.observe(outcome.depth / max(num_ids, 1))
        if len(results) < num_ids:
            metrics.SHORT.labels("index exhausted" if outcome.complete else "depth or deadline").inc()
        headers = {DEPTH: str(outcome.depth)}
        if notes:
            headers[NOT_HONOURED] = "; ".join(f"{k}: {v}" for k, v in notes.items()).encode(
                "ascii", "replace").decode()
        # Returned as it is: FastAPI would otherwise validate and re-encode every result.
        return JSONResponse(results, headers=headers)

    @app.post("/metadata", summary="metadata of result ids (clip front pages through results with it)",
              response_model=None, responses={200: {"description": "[{id, metadata}], metadata null for an "
                                                                   "unknown id", "content": {"application/json": {
                                                    "schema": {"type": "array", "items": {"type": "object"}}}}}})
    def metadata(query: MetadataQuery):
        check_index(query.indice_name)
        if len(query.ids) > settings.max_num_result_ids:
            raise QueryError(f"ids: at most {settings.max_num_result_ids} per request")
        metas = engine.metadata(np.asarray(query.ids, np.int64)) if query.ids else []
        return JSONResponse([{"id": gid, "metadata": meta} for gid, meta in zip(query.ids, metas)])

    @app.post("/export", summary="the given results as a parquet file img2dataset downloads as it is",
              response_class=Response,
              responses={200: {"content": {"application/vnd.apache.parquet": {}},
                               "description": "url, caption, similarity, metadata and tags"}})
    def export(query: ExportQuery):
        from clipfleet.search.subset import parquet_bytes, subset_table
        check_index(query.indice_name)
        if len(query.ids) > settings.max_num_result_ids:
            raise QueryError(f"ids: at most {settings.max_num_result_ids} per request")
        if query.similarities is not None and len(query.similarities) != len(query.ids):
            raise QueryError("similarities: one per id")
        table = subset_table(engine, query.ids, query.similarities)
        return Response(parquet_bytes(table), media_type="application/vnd.apache.parquet",
                        headers={"Content-Disposition": 'attachment; filename="clipfleet-subset.parquet"'})

    return Guard(app, settings.max_request_bytes), app


def app_from_env():
    """The ASGI app of one server process (uvicorn's factory): its own engine and model."""
    from clipfleet.search.settings import ServeSettings
    from clipfleet.shared.options import build
    from clipfleet.shared.storage import Store
    from clipfleet.search.server import worker_failed
    config = json.loads(os.environ[ENV_CONFIG])
    settings = build(ServeSettings, config["settings"])
    try:
        engine = Engine(Store(config["store"]), settings, threads=config["threads"], cache=Path(config["cache"]))
    except Exception as exc:  # whatever it is, restarting this worker would only fail again
        worker_failed(f"{exc.__class__.__name__}: {exc}")
        raise
    guarded, _ = build_app(engine, config["index_name"])
    return guarded
