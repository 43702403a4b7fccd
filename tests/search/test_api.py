"""The service as clip-retrieval's clients call it: ClipClient's own code, clip front's request
bodies, clip back's response shape; run through `clipfleet serve --workers 2` on loopback."""
from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import psutil
import pytest

from clipfleet.search.settings import ServeSettings

COLOR_SHAPE = ("green", "circle")  # the commonest class of the world (9 images)


def clip_client_module():
    """clip-retrieval's clip_client.py as it ships (the package's __init__ would pull in Flask,
    torch and the rest of clip back, so the module is loaded on its own)."""
    spec = importlib.util.find_spec("clip_retrieval")
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def clip_client_body(**fields) -> dict:
    """Exactly what ClipClient posts with its defaults (every field, nulls included)."""
    body = {"text": None, "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
            "use_safety_model": True, "use_violence_detector": True, "indice_name": "sandbox",
            "use_mclip": False, "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image",
            "num_images": 40, "num_result_ids": 40}
    body.update(fields)
    return body


def test_clip_client_as_it_ships(live):
    """ClipClient's defaults: dedup, safety and violence filters on, aesthetic score 9 at 0.5."""
    module = clip_client_module()
    client = module.ClipClient(url=live.url + "/knn-service", indice_name="sandbox", num_images=12)
    results = client.query(text="a red circle")
    assert len(results) == 12, "filters keep the count"
    for r in results:
        assert {"id", "similarity", "url", "caption"} <= set(r)
        assert live.known[r["id"]]["url"] == r["url"], "ids map to their own metadata"
        assert not live.known[r["id"]]["unsafe"] or r["punsafe"] <= 0.5
        assert r["punsafe"] <= 0.5
    assert [r["similarity"] for r in results] == sorted((r["similarity"] for r in results), reverse=True)
    by_embedding = client.query(embedding_input=[0.0] * 127 + [1.0])
    assert len(by_embedding) == 12


def test_response_shape_and_headers(live):
    body = clip_client_body(text="a green circle", num_images=9, num_result_ids=30, aesthetic_score=None,
                            aesthetic_weight=None)
    response = live.post("/knn-service", json.dumps(body))  # no content type, as ClipClient sends it
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 30
    assert all("url" in r and "caption" in r for r in results[:9])
    assert all(set(r) == {"id", "similarity"} for r in results[9:])
    assert "use_violence_detector" in response.headers["X-Clipfleet-Not-Honoured"]
    assert int(response.headers["X-Clipfleet-Search-Depth"]) >= 30
    safe = [gid for gid, t in live.known.items() if (t["true_color"], t["true_shape"]) == COLOR_SHAPE
            and not t["unsafe"] and t["duplicate_of"] is None]
    top = [r["id"] for r in results[:len(safe)]]
    assert len(set(top) & set(safe)) >= len(safe) - 1, "the safe green circles come first"


def test_clip_front_body(live):
    """clip front posts text/plain, aesthetic fields as strings ('' for none), text '' for image searches."""
    body = {"text": "a blue square", "image": None, "image_url": None, "embedding_input": None,
            "modality": "image", "num_images": 8, "indice_name": "sandbox", "num_result_ids": 100,
            "use_mclip": False, "deduplicate": True, "use_safety_model": True, "use_violence_detector": True,
            "aesthetic_score": "", "aesthetic_weight": "0.5"}
    response = live.post("/knn-service", json.dumps(body), headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 100 or len(results) == len({r["id"] for r in results})
    ids = [r["id"] for r in results[8:40]]
    metas = live.post("/metadata", json.dumps({"ids": ids, "indice_name": "sandbox"}),
                      headers={"Content-Type": "text/plain;charset=UTF-8"}).json()
    assert [m["id"] for m in metas] == ids
    assert all(m["metadata"]["url"] == live.known[m["id"]]["url"] for m in metas)


def test_clip_back_minimal_body_defaults_filters_off(live):
    body = {"text": "a green star", "modality": "image", "num_images": 10, "indice_name": "sandbox"}
    response = live.post("/knn-service", body)
    assert response.status_code == 200
    assert "X-Clipfleet-Not-Honoured" not in response.headers
    assert len(response.json()) == 10


def test_image_upload_and_image_url(live, sandbox, world):
    red_circles = [gid for gid, t in live.known.items()
                   if (t["true_color"], t["true_shape"]) == COLOR_SHAPE and t["duplicate_of"] is None]
    probe = live.known[red_circles[0]]
    data = (world / "web" / "img" / probe["url"].rsplit("/", 1)[1]).read_bytes()
    body = {"image": base64.b64encode(data).decode(), "modality": "image", "num_images": 3, "indice_name": "sandbox"}
    results = live.post("/knn-service", body).json()
    assert results[0]["id"] == red_circles[0] and results[0]["similarity"] > 0.99
    by_url = live.post("/knn-service", {"image_url": probe["url"], "num_images": 3, "modality": "image",
                                        "indice_name": "sandbox"}).json()
    assert by_url[0]["id"] == red_circles[0]
    similar = live.post("/knn-service", {"similar_to": red_circles[0], "num_images": 3, "modality": "image"}).json()
    assert similar[0]["id"] == red_circles[0] and similar[0]["similarity"] > 0.99


def test_text_index(live):
    results = live.post("/knn-service", {"text": "a yellow triangle", "modality": "text", "num_images": 5,
                                         "indice_name": "sandbox"}).json()
    assert len(results) == 5
    assert sum("yellow" in r["caption"] or "triangle" in r["caption"] for r in results) >= 3


@pytest.mark.parametrize("body, message", [
    ({"text": "x", "indice_name": "laion5B", "num_images": 3, "modality": "image"}, "sandbox"),
    ({"num_images": 3, "modality": "image", "indice_name": "sandbox"}, "one of text"),
    ({"text": "x", "num_images": 0, "modality": "image"}, "num_images"),
    ({"text": "x", "num_images": 3, "modality": "audio"}, "modality"),
    ({"embedding_input": [1.0, 2.0], "num_images": 3}, "128"),
    ({"image": "bm90IGFuIGltYWdl", "num_images": 3}, "not an image"),
    ({"image": "!!!", "num_images": 3}, "image"),
    ({"image_url": "http://169.254.169.254/latest/meta-data/", "num_images": 3}, "image_url"),
    ({"image_url": "file:///etc/passwd", "num_images": 3}, "unsupported url"),
    ({"similar_to": 5, "num_images": 3}, "no sample 5"),
    ({"text": "x", "aesthetic_score": "nine"}, "aesthetic_score"),
    ({"text": "x", "aesthetic_score": 12}, "aesthetic_score"),
    ("[1, 2]", "body"),
    ("{not json", "JSON"),
])
def test_bad_requests_are_400_with_a_message(live, body, message):
    response = live.post("/knn-service", body if isinstance(body, str) else json.dumps(body))
    assert response.status_code == 400, response.text
    assert message.lower() in response.json()["error"].lower()


def test_unknown_index_on_metadata(live):
    response = live.post("/metadata", {"ids": [1], "indice_name": "nope"})
    assert response.status_code == 400 and "sandbox" in response.json()["error"]


def test_caps(live):
    big = live.post("/knn-service", b"{" + b" " * (9 * 2**20) + b"}")
    assert big.status_code == 413
    clamped = live.post("/knn-service", {"text": "a red circle", "num_images": 50_000, "modality": "image"})
    assert clamped.status_code == 200
    assert "lowered from 50000 to 10000" in clamped.headers["X-Clipfleet-Not-Honoured"]
    assert len(clamped.json()) == len(live.known), "the whole index, no more"


def test_health_metrics_openapi(live):
    health = live.get("/health").json()
    assert health["status"] == "ok" and health["ntotal"] == len(live.known) and health["model"] == "shapes"
    assert live.get("/indices-list").json() == ["sandbox"]
    for _ in range(3):
        live.post("/knn-service", {"text": "a pink heart", "num_images": 4, "use_safety_model": True})
    text = live.get("/metrics").text
    assert 'clipfleet_search_request_seconds_bucket{endpoint="/knn-service"' in text
    assert "clipfleet_search_results_count" in text and "clipfleet_search_depth_bucket" in text
    spec = live.get("/openapi.json").json()
    assert {"/knn-service", "/metadata", "/indices-list", "/health", "/export"} <= set(spec["paths"])
    assert "text" in spec["components"]["schemas"]["KnnQuery"]["properties"]


def test_binds_loopback_by_default(live):
    assert ServeSettings().host == "127.0.0.1"
    listening = [c.laddr for c in psutil.Process(live.proc.pid).net_connections("tcp") if c.status == "LISTEN"]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)


def test_takedown_hides_a_sample_from_search_and_metadata(search_store, sandbox, tmp_path):
    """A sample taken down while the server runs is neither found nor shown by id."""
    import shutil
    import time
    import numpy as np
    from clipfleet.shared import layout
    from clipfleet.shared.storage import Store
    from tests.search.conftest import start_server, stop_server
    store_dir = tmp_path / "run"
    shutil.copytree(search_store[0], store_dir)
    known = search_store[1]
    proc, url = start_server(str(store_dir), tmp_path / "cache", "--index-name", "sandbox")
    try:
        import requests
        copied = {t["duplicate_of"] for t in known.values()}
        victim = next(g for g, t in known.items() if t["duplicate_of"] is None and g not in copied)
        vector = Store(str(store_dir)).read_bytes(layout.image_embeddings(victim >> layout.ROW_BITS))
        emb = np.load(__import__("io").BytesIO(vector))[victim & ((1 << layout.ROW_BITS) - 1)].astype(float)
        body = {"embedding_input": emb.tolist(), "num_images": 3, "modality": "image"}
        assert requests.post(url + "/knn-service", json=body, timeout=30).json()[0]["id"] == victim
        Store(str(store_dir)).write_bytes(layout.TAKEDOWN_IDS, _npy(np.array([victim], np.int64)))
        time.sleep(2.5)  # the service looks at the list every 2 s
        results = requests.post(url + "/knn-service", json=body, timeout=30).json()
        assert victim not in [r["id"] for r in results] and len(results) == 3
        metas = requests.post(url + "/metadata", json={"ids": [victim]}, timeout=30).json()
        assert metas == [{"id": victim, "metadata": None}]
    finally:
        stop_server(proc)


def _npy(array) -> bytes:
    import io
    import numpy as np
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_serve_stops_with_a_message_when_it_cannot_serve(search_store, tmp_path):
    import shutil
    import subprocess
    import sys
    from clipfleet.producer.fleet import free_port
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.shared.storage import Store
    empty = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "serve", "--store", str(tmp_path / "none"),
                            "--cache-dir", str(tmp_path / "c0")], capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "no embeddings/metadata" in empty.stderr
    store_dir = tmp_path / "run"
    shutil.copytree(search_store[0], store_dir)
    store = Store(str(store_dir))
    RunConfig.make(store=store.uri, embed_model="ViT-B-32/no-such-tag").save(store)
    done = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "serve", "--store", str(store_dir),
                           "--workers", "2", "--port", str(free_port()), "--cache-dir", str(tmp_path / "c1")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "a search worker could not start" in done.stderr and "no-such-tag" in done.stderr
