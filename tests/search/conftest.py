"""The search tests' world: a sandbox web on loopback and a run store built from it the way
the embed, tag and index stages lay theirs out (the shipped `shapes` model's real embeddings,
its real watermark and unsafe heads, a faiss index of global ids), plus a few near-duplicates.

Aesthetic scores come from no model here (shapes has no aesthetic head): the fixture rates red
images 9 and the others 2, so re-weighting towards rating 9 has a checkable meaning.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.producer.fleet import free_port
from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared import layout
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store

WORLD_SAMPLES = 160
SHARDS = (3, 1000)           # two shards with ids that are not 0, 1: ids really carry the shard
DUPLICATES = 4               # images of shard 3 posted again (same picture, another URL) in shard 1000
DUPLICATE_OF = (0, 1, 2, 3)  # their rows in shard 3


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("search-world")
    make_sandbox(directory, samples=WORLD_SAMPLES, port=free_port(), seed=11, wat_files=1)
    return directory


@pytest.fixture(scope="session")
def sandbox(world):
    with SandboxServer(world) as server:
        yield server


@pytest.fixture(scope="session")
def truth(world) -> pa.Table:
    return pq.read_table(world / "ground_truth" / "images.parquet")


def _embed(world: Path, truth: pa.Table):
    import torch
    from PIL import Image
    from clipfleet.shared.models import load_clip
    model, preprocess, tokenizer = load_clip("shapes")
    files = [world / "web" / "img" / url.rsplit("/", 1)[1] for url in truth["url"].to_pylist()]
    with torch.inference_mode():
        pixels = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
        image = model.encode_image(pixels).float()
        text = model.encode_text(tokenizer(truth["caption"].to_pylist())).float()
    image = torch.nn.functional.normalize(image, dim=-1).numpy()
    text = torch.nn.functional.normalize(text, dim=-1).numpy()
    return image, text


def build_store(store_uri: str, world: Path, truth: pa.Table, with_text_index: bool = True) -> dict:
    """Write a run store with embeddings, metadata, tags and a serving index; returns ground truth
    per global id: {gid: row of images.parquet (+ "duplicate_of")}."""
    from clipfleet.shared.models import load_tag_heads, score_tags
    store = Store(store_uri)
    RunConfig.make(store=store.uri, embed_model="shapes").save(store)
    image, text = _embed(world, truth)
    rows = truth.to_pylist()
    half = len(rows) // 2
    parts = {SHARDS[0]: list(range(half)), SHARDS[1]: list(range(half, len(rows))) + list(DUPLICATE_OF)}
    heads = load_tag_heads("shapes")
    known, all_ids, all_img, all_txt = {}, [], [], []
    for shard, members in parts.items():
        img, txt = image[members].copy(), text[members].copy()
        urls = [rows[m]["url"] for m in members]
        if shard == SHARDS[1]:
            for j in range(len(members) - DUPLICATES, len(members)):
                urls[j] += "?copy=1"
        meta = pa.table({
            "key": [f"{shard:05d}{r:04d}" for r in range(len(members))],
            "url": urls, "caption": [rows[m]["caption"] for m in members],
            "similarity": pa.array((img * txt).sum(1), pa.float32()),
            "language": [rows[m]["language"] for m in members],
            "width": pa.array([rows[m]["width"] for m in members], pa.int32()),
            "height": pa.array([rows[m]["height"] for m in members], pa.int32())})
        scores = score_tags(heads, img)
        tags = pa.table({"key": meta["key"],
                         "punsafe": pa.array(scores["unsafe"], pa.float32()),
                         "pwatermark": pa.array(scores["watermark"], pa.float32()),
                         "aesthetic": pa.array([9.0 if rows[m]["true_color"] == "red" else 2.0
                                                for m in members], pa.float32())})
        _write(store, layout.embedding_metadata(shard), lambda p, t=meta: pq.write_table(t, p))
        _write(store, layout.tag_shard(shard), lambda p, t=tags: pq.write_table(t, p))
        _write(store, layout.image_embeddings(shard), lambda p, a=img: np.save(p, a.astype(np.float16)))
        _write(store, layout.text_embeddings(shard), lambda p, a=txt: np.save(p, a.astype(np.float16)))
        for r, m in enumerate(members):
            gid = layout.global_id(shard, r)
            known[gid] = {**rows[m], "url": urls[r], "duplicate_of": None}
            if shard == SHARDS[1] and r >= len(members) - DUPLICATES:
                known[gid]["duplicate_of"] = layout.global_id(SHARDS[0], m)
        all_ids += [layout.global_id(shard, r) for r in range(len(members))]
        all_img.append(img)
        all_txt.append(txt)
    ids = np.asarray(all_ids, np.int64)
    modalities = (("image", np.concatenate(all_img)), ("text", np.concatenate(all_txt)))
    for modality, vectors in modalities[:2 if with_text_index else 1]:
        write_serving_index(store, modality, vectors, ids, list(parts))
    return known


def write_serving_index(store: Store, modality: str, vectors: np.ndarray, ids: np.ndarray, shards: list) -> None:
    """A flat serving index where the index stage puts one (generation 1) and the infos.json
    that makes ServingIndex open it."""
    import faiss
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    flat.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids)
    rel = f"{layout.serving_dir(1, modality)}/merged.index"
    _write(store, rel, lambda p: faiss.write_index(flat, p))
    store.write_json(layout.index_infos(modality), {
        "modality": modality, "generation": 1, "index_key": "Flat", "dim": int(vectors.shape[1]),
        "metric": "inner_product", "shards": sorted(shards), "index_file": rel, "ivfdata_file": None,
        "vectors": len(ids), "search_params": ""})


def _write(store: Store, rel: str, writer) -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / Path(rel).name)
        writer(path)
        store._put(path, rel)


@pytest.fixture(scope="session")
def search_store(tmp_path_factory, world, truth):
    """(store path, ground truth by global id), local, built once per session."""
    directory = tmp_path_factory.mktemp("search-store") / "run"
    known = build_store(str(directory), world, truth)
    return str(directory), known


@pytest.fixture(scope="session")
def engine(search_store, tmp_path_factory):
    from clipfleet.search.engine import Engine
    from clipfleet.search.settings import ServeSettings
    settings = ServeSettings(cache_dir=str(tmp_path_factory.mktemp("search-cache")), allow_private_image_urls=True)
    return Engine(Store(search_store[0]), settings, threads=1)


class LiveServer:
    def __init__(self, proc, url: str, store: str, known: dict):
        self.proc, self.url, self.store, self.known = proc, url, store, known

    def post(self, path: str, body, **kwargs):
        import json
        import requests
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(self.url + path, data=data, timeout=60, **kwargs)

    def get(self, path: str, **kwargs):
        import requests
        return requests.get(self.url + path, timeout=60, **kwargs)


def start_server(store: str, cache: Path, *extra: str):
    """`clipfleet serve` as a user starts it, on a free loopback port; waits for /health."""
    import subprocess
    import sys
    import time
    import requests
    port = free_port()
    cache.mkdir(parents=True, exist_ok=True)
    log = cache.parent / f"serve-{port}.log"  # a file, not a pipe nobody reads while it runs
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "clipfleet.producer.cli", "serve", "--store", store,
                                 "--port", str(port), "--cache-dir", str(cache), *extra],
                                stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"clipfleet serve exited {proc.returncode}: {log.read_text()}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("clipfleet serve did not answer /health in 120 s")


def stop_server(proc) -> str:
    import subprocess
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.log.read_text()


@pytest.fixture(scope="session")
def live(search_store, sandbox, tmp_path_factory):
    """The service with two worker processes, as `clipfleet serve --workers 2` runs it."""
    store, known = search_store
    proc, url = start_server(store, tmp_path_factory.mktemp("live-cache"), "--workers", "2",
                             "--allow-private-image-urls", "--index-name", "sandbox")
    yield LiveServer(proc, url, store, known)
    stop_server(proc)
