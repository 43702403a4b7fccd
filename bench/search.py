"""Search benchmark: queries/s and p50/p99 latency under concurrent load, side by side in one run.

One synthetic store (SAMPLES vectors of the shapes model's dimension in shards of SHARD rows,
clustered, with metadata and tags; an IVF index as autofaiss builds for this size, nprobe
NPROBE) is searched by:
- the floor: a bare faiss search loop on the same index file (k=40, one query per call), alone
  and from CONCURRENCY threads at once;
- `clipfleet serve --workers 2`: embedding queries and text queries (the shapes model embeds
  them), ClipClient's body with num_images 40; then with ClipClient's default filters
  (deduplicate, safety) as well;
- clip-retrieval 2.45's `clip back` on the same index and metadata (its default parquet
  metadata), embedding queries, when its venv (.bench/clip-retrieval, as bench/clip.py builds
  it) can be made. clip back loads a CLIP model at start; it gets ViT-B-32 with random weights
  (it is only asked embedding queries, so the model is never used: speed only).
The load generator is an asyncio HTTP/1.1 client on 127.0.0.1 with kept-alive connections, bounded
by REQUESTS per run and TIME_LIMIT seconds; best of REPEATS interleaved runs. Goal: the service's p99 <= 2x the bare search's per
query + 5 ms, >= 10x clip back's queries/s, no error under load.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from bench.sizes import repeats, size

SAMPLES = size("SEARCH_SAMPLES")
SHARD = 20_000
DIM = 128          # the shapes model's
NLIST, NPROBE = 1024, 16
K = 40             # ClipClient's num_images
CONCURRENCY = int(os.environ.get("CLIPFLEET_BENCH_SEARCH_CONCURRENCY", 8))
REQUESTS = size("SEARCH_REQUESTS")
TIME_LIMIT = 30.0
REPEATS = repeats(3)
WORKERS = 2


# ----------------------------------------------------------------------------- the store

def build_store(root: Path) -> tuple[str, Path]:
    """A run store for clipfleet, and clip back's folder (image.index + metadata/) beside it."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq
    from clipfleet.shared import layout
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.shared.storage import Store

    store_dir, back_dir = root / "store", root / "clip-back"
    (back_dir / "metadata").mkdir(parents=True)
    store = Store(str(store_dir))
    RunConfig.make(store=store.uri, embed_model="shapes").save(store)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(512, DIM)).astype(np.float32)
    vectors, ids = [], []
    for shard in range(SAMPLES // SHARD):
        n = SHARD
        v = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.normal(size=(n, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        rows = np.arange(n)
        meta = pa.table({"key": [f"{shard:05d}{r:04d}" for r in rows],
                         "url": [f"http://127.0.0.1:9/img/{shard}/{r}.jpg" for r in rows],
                         "caption": [f"sample {r} of shard {shard}" for r in rows],
                         "similarity": pa.array(rng.uniform(0.28, 0.4, n), pa.float32()),
                         "language": ["en"] * n, "width": pa.array([256] * n, pa.int32()),
                         "height": pa.array([256] * n, pa.int32())})
        tags = pa.table({"key": meta["key"], "punsafe": pa.array(rng.beta(1, 12, n), pa.float32()),
                         "pwatermark": pa.array(rng.beta(1, 8, n), pa.float32()),
                         "aesthetic": pa.array(rng.uniform(1, 10, n), pa.float32())})
        for rel, write in ((layout.embedding_metadata(shard), lambda p, t=meta: pq.write_table(t, p)),
                           (layout.tag_shard(shard), lambda p, t=tags: pq.write_table(t, p)),
                           (layout.image_embeddings(shard), lambda p, a=v: np.save(p, a.astype(np.float16)))):
            path = store_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            write(str(path))
        pq.write_table(meta.select(["url", "caption"]), back_dir / "metadata" / f"{shard:05d}.parquet")
        vectors.append(v)
        ids.append(np.asarray([layout.global_id(shard, r) for r in rows], np.int64))
    vectors, ids = np.concatenate(vectors), np.concatenate(ids)
    # The serving index as the index stage builds one: trained once, a partial per shard, merged
    # with on-disk inverted lists (what ServingIndex opens), nprobe from infos.json.
    from clipfleet.workers.index import build
    key = f"IVF{NLIST},Flat"
    trained = build.train(DIM, key, vectors[rng.choice(len(vectors), min(len(vectors), 64 * NLIST), replace=False)])
    parts_dir, gen_dir = root / "parts", store_dir / layout.serving_dir(1)
    parts_dir.mkdir()
    gen_dir.mkdir(parents=True)
    build.write(trained, parts_dir / "trained.index")
    parts = []
    for n, start in enumerate(range(0, len(vectors), SHARD)):
        part = build.partial(parts_dir / "trained.index", vectors[start:start + SHARD], ids[start:start + SHARD])
        build.write(part, parts_dir / f"{n}.index")
        parts.append(parts_dir / f"{n}.index")
    build.merge_ivf(parts_dir / "trained.index", parts, gen_dir)
    rel = layout.serving_dir(1)
    (store_dir / layout.index_infos()).write_text(json.dumps({
        "modality": "image", "generation": 1, "index_key": key, "dim": DIM, "metric": "inner_product",
        "shards": list(range(SAMPLES // SHARD)), "index_file": f"{rel}/{build.INDEX_FILE}",
        "ivfdata_file": f"{rel}/{build.IVF_DATA}", "vectors": len(ids), "search_params": f"nprobe={NPROBE}"}))
    # clip back maps index ids to rows of its concatenated metadata: the same trained index, row ids.
    theirs = build.read(parts_dir / "trained.index")
    theirs.add(vectors)
    faiss.extract_index_ivf(theirs).nprobe = NPROBE
    faiss.write_index(theirs, str(back_dir / "image.index"))
    return str(store_dir), back_dir


def queries(n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    q = rng.normal(size=(n, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- the floor

def floor(store: str, qs: np.ndarray) -> dict:
    import faiss
    from clipfleet.shared.serving import open_index
    faiss.omp_set_num_threads(1)  # one query per call: its threads would only contend
    infos = json.loads((Path(store) / "index" / "infos.json").read_text())
    index = open_index(Path(store) / infos["index_file"], ivf=True)
    faiss.ParameterSpace().set_index_parameters(index, infos["search_params"])
    index.search(qs[:50], K)  # page the lists in, as a warm server has them
    alone = []
    for q in qs[:1000]:
        t = time.perf_counter()
        index.search(q[None, :], K)
        alone.append(time.perf_counter() - t)

    def one(q):
        t = time.perf_counter()
        index.search(q[None, :], K)
        return time.perf_counter() - t

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        loaded = list(pool.map(one, qs[:REQUESTS]))
    wall = time.perf_counter() - started
    return {"alone": summary(alone, sum(alone)), "loaded": summary(loaded, wall)}


def keep_best(results: dict, name: str, run: dict, score=lambda r: r["qps"]) -> None:
    if name not in results or score(run) > score(results[name]):
        results[name] = run


def summary(latencies: list[float], wall: float, errors: int = 0) -> dict:
    lat = np.asarray(latencies) * 1000
    return {"qps": len(lat) / wall if wall else 0.0, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None, "requests": len(lat), "errors": errors}


# ----------------------------------------------------------------------------- the load generator

async def _client(port: int, bodies: list[bytes], cursor: list[int], total: int, deadline: float,
                  latencies: list[float], errors: list[str]) -> None:
    reader = writer = None
    while cursor[0] < total and time.perf_counter() < deadline:
        i = cursor[0]
        cursor[0] += 1
        body = bodies[i % len(bodies)]
        request = (f"POST /knn-service HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        started = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            if "content-length" in headers:
                await reader.readexactly(int(headers["content-length"]))
            else:
                await reader.read()
                headers["connection"] = "close"
            if headers.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0"):
                writer.close()
                reader = writer = None
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(str(status))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors.append(exc.__class__.__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def load(port: int, bodies: list[bytes], total: int = REQUESTS, concurrency: int = CONCURRENCY) -> dict:
    latencies, errors, cursor = [], [], [0]

    async def main():
        deadline = time.perf_counter() + TIME_LIMIT
        await asyncio.gather(*(_client(port, bodies, cursor, total, deadline, latencies, errors)
                               for _ in range(concurrency)))

    for body in bodies[:20]:  # warm up: first requests page in the index and metadata
        asyncio.run(_warm(port, body))
    started = time.perf_counter()
    asyncio.run(main())
    return summary(latencies, time.perf_counter() - started, len(errors))


async def _warm(port: int, body: bytes) -> None:
    await _client(port, [body], [0], 1, time.perf_counter() + 30, [], [])


def clip_client_body(**fields) -> bytes:
    body = {"text": None, "image": None, "image_url": None, "embedding_input": None, "deduplicate": False,
            "use_safety_model": False, "use_violence_detector": False, "indice_name": "bench",
            "use_mclip": False, "aesthetic_score": "", "aesthetic_weight": "", "modality": "image",
            "num_images": K, "num_result_ids": K, **fields}
    return json.dumps(body).encode()


def wait_for(port: int, proc: subprocess.Popen, path: str, seconds: float) -> None:
    import urllib.request
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {Path(proc.log).read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no answer on port {port} in {seconds:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- clip back

CLIP_BACK = """
import importlib, sys
back = importlib.import_module("clip_retrieval.clip_back")  # the package's __init__ shadows the module's name
back.clip_back(indices_paths=sys.argv[1], port=int(sys.argv[2]), clip_model=sys.argv[3], use_jit=False,
               enable_mclip_option=False, provide_aesthetic_embeddings=False, columns_to_return=["url", "caption"])
"""


def start_clip_back(back_dir: Path, port: int, work: Path) -> subprocess.Popen:
    from bench.clip import ensure_clip_retrieval, random_checkpoint
    venv = ensure_clip_retrieval()
    checkpoint = random_checkpoint(work / "vit-b-32-random.pt")
    paths = work / "indices_paths.json"
    paths.write_text(json.dumps({"bench": str(back_dir)}))
    log = open(work / "clip-back.log", "w")
    proc = subprocess.Popen([str(venv / "bin" / "python"), "-c", CLIP_BACK, str(paths), str(port),
                             f"open_clip:ViT-B-32//{checkpoint}"], stdout=log, stderr=subprocess.STDOUT, cwd=str(work))
    proc.log = work / "clip-back.log"
    wait_for(port, proc, "/indices-list", 300)
    return proc


# ----------------------------------------------------------------------------- main

def main() -> dict:
    from clipfleet.producer.fleet import free_port
    results: dict = {"samples": SAMPLES, "concurrency": CONCURRENCY, "index": f"IVF{NLIST},Flat nprobe={NPROBE}"}
    with tempfile.TemporaryDirectory(prefix="clipfleet-bench-search-") as tmp:
        root = Path(tmp)
        print(f"building a store of {SAMPLES} samples", flush=True)
        store, back_dir = build_store(root)
        qs = queries(REQUESTS)
        embedding = [clip_client_body(embedding_input=q.tolist()) for q in qs[:500]]
        words = ["red", "blue", "green", "yellow", "pink", "brown", "purple", "orange"]
        shapes = ["circle", "square", "star", "heart", "triangle", "cross"]
        texts = [clip_client_body(text=f"a {c} {s} on a plain background") for c in words for s in shapes]
        filtered = [clip_client_body(embedding_input=q.tolist(), deduplicate=True, use_safety_model=True)
                    for q in qs[:500]]
        port = free_port()
        log = open(root / "serve.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "clipfleet.producer.cli", "serve", "--store", store,
                                 "--port", str(port), "--workers", str(WORKERS), "--index-name", "bench",
                                 "--cache-dir", str(root / "cache")], stdout=log, stderr=subprocess.STDOUT)
        proc.log = root / "serve.log"
        try:
            wait_for(port, proc, "/health", 300)
            # Interleaved REPEATS times, best of each kept: a busy spell from other work on this
            # shared machine hits every row alike.
            for _ in range(REPEATS):
                keep_best(results, "floor", floor(store, qs),
                          lambda f: f["loaded"]["qps"])
                keep_best(results, "clipfleet_embedding", load(port, embedding))
                # One client: latency without queueing behind other requests on these cores.
                keep_best(results, "clipfleet_embedding_1", load(port, embedding, total=1000, concurrency=1))
                keep_best(results, "clipfleet_text", load(port, texts))
                keep_best(results, "clipfleet_filtered", load(port, filtered))
        finally:
            stop(proc)
        try:
            back_port = free_port()
            back = start_clip_back(back_dir, back_port, root)
            try:
                results["clip_back_embedding"] = load(back_port, embedding, total=REQUESTS // 5)
                if results["clip_back_embedding"]["errors"]:
                    print("clip back errors:", Path(back.log).read_text()[-2000:])
            finally:
                stop(back)
        except Exception as exc:  # reported, not fatal: the other rows still stand
            results["clip_back_error"] = f"{exc.__class__.__name__}: {exc}"[:500]
    return report(results)


def report(r: dict) -> dict:
    f_alone, f_loaded = r["floor"]["alone"], r["floor"]["loaded"]
    rows = [("bare faiss, one at a time", f_alone), (f"bare faiss, {r['concurrency']} threads", f_loaded),
            ("clipfleet serve, embedding, 1 client", r["clipfleet_embedding_1"]),
            ("clipfleet serve, embedding", r["clipfleet_embedding"]), ("clipfleet serve, text", r["clipfleet_text"]),
            ("clipfleet serve, embedding + dedup + safety", r["clipfleet_filtered"])]
    if "clip_back_embedding" in r:
        rows.append(("clip back, embedding", r["clip_back_embedding"]))
    print(f"{r['samples']} samples, {r['index']}, k={K}, {r['concurrency']} concurrent clients, "
          f"{WORKERS} server workers")
    print(f"{'':<46}{'queries/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, s in rows:
        print(f"{name:<46}{s['qps']:>10.1f}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['errors']:>8}")
    goal_ms = 2 * f_loaded["p99_ms"] + 5
    out = {"samples": r["samples"], "concurrency": r["concurrency"],
           "floor_alone_p50_ms": f_alone["p50_ms"], "floor_loaded_p99_ms": f_loaded["p99_ms"],
           **{f"{name}_{key}": s[key] for name, s in (("embedding", r["clipfleet_embedding"]),
                                                       ("text", r["clipfleet_text"]),
                                                       ("filtered", r["clipfleet_filtered"]))
              for key in ("qps", "p50_ms", "p99_ms", "errors")},
           # <= 1 meets the goal: p99 within 2x the bare search's (same load) + 5 ms.
           "embedding_p99_vs_goal_ratio": r["clipfleet_embedding"]["p99_ms"] / goal_ms,
           "floor_vs_embedding_qps_ratio": f_loaded["qps"] / r["clipfleet_embedding"]["qps"]}
    alone_goal_ms = 2 * f_alone["p99_ms"] + 5
    one = r["clipfleet_embedding_1"]
    out.update(embedding_1_qps=one["qps"], embedding_1_p50_ms=one["p50_ms"], embedding_1_p99_ms=one["p99_ms"],
               floor_alone_p99_ms=f_alone["p99_ms"], embedding_1_p99_vs_goal_ratio=one["p99_ms"] / alone_goal_ms)
    print(f"p99 goal, one client (2 x bare faiss p99 one at a time + 5 ms): {alone_goal_ms:.2f} ms; the service's "
          f"p99 is {out['embedding_1_p99_vs_goal_ratio']:.2f}x of it")
    print(f"p99 goal, {r['concurrency']} clients (2 x bare faiss p99 from as many threads + 5 ms): {goal_ms:.2f} ms; "
          f"the service's p99 is {out['embedding_p99_vs_goal_ratio']:.2f}x of it")
    if "clip_back_embedding" in r:
        back = r["clip_back_embedding"]
        out.update(clip_back_qps=back["qps"], clip_back_p50_ms=back["p50_ms"], clip_back_p99_ms=back["p99_ms"],
                   clip_back_errors=back["errors"],
                   embedding_vs_clip_back_qps_ratio=r["clipfleet_embedding"]["qps"] / back["qps"])
        print(f"clipfleet / clip back queries/s: {out['embedding_vs_clip_back_qps_ratio']:.1f}x (goal >= 10x)")
    else:
        out["clip_back_error"] = r.get("clip_back_error")
        print(f"clip back could not be started: {r.get('clip_back_error')}")
    (REPO / ".bench").mkdir(exist_ok=True)
    (REPO / ".bench" / "search.json").write_text(json.dumps({**r, **out}, indent=1))
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
