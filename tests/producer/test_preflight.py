"""`clipfleet run` with the default model names, pointed at a model hub on loopback through
HF_ENDPOINT: the weights are fetched once for the fleet before any task and every shard is
judged; offline with an empty cache, the run is refused before anything is downloaded."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipfleet.producer.fleet import free_port
from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared import layout
from clipfleet.shared.models.cache import cache_uri_of, read_manifest
from clipfleet.shared.storage import Store
from tests.shared.hub_server import (Hub, shapes_repo_files, vit_b32_weights, xlmr_clip_weights,
                                     xlmr_tower_repo)

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "clipfleet.producer.cli"]
# Where open_clip's pretrained table puts ViT-B-32/openai on the hub, and its preferred file.
B32_REPO, B32_FILE = "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"
SHAPES_REPO = "clipfleet-test/shapes"
# LAION's multilingual filter: open_clip's repo for it, and its text tower's repo.
XLMR_REPO, TOWER_REPO = "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k", "xlm-roberta-base"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("web")
    make_sandbox(directory, samples=24, port=free_port(), seed=11, wat_files=1)
    with SandboxServer(directory) as server:
        yield directory, server


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    with Hub(root / "repos") as server:
        server.add_file(B32_REPO, B32_FILE, vit_b32_weights(root / "b32"))
        for name, path in shapes_repo_files(root / "shapes").items():
            server.add_file(SHAPES_REPO, name, path)
        for name, path in xlmr_tower_repo(root / "tower").items():
            server.add_file(TOWER_REPO, name, path)
        server.add_file(XLMR_REPO, B32_FILE, xlmr_clip_weights(root / "xlmr", server.url, root / "build-hf"))
        server.requests.clear()  # building the checkpoint read the tower's config
        yield server


def run_cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), cwd=REPO, capture_output=True, text=True, timeout=560, env=env)


def hub_env(hub: Hub, hf_home: Path, **more) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), **more})
    return env


def wats(world) -> list[str]:
    return sorted(str(p) for p in (world[0] / "wat").glob("*.wat.gz"))


@pytest.mark.timeout(600)
def test_default_models_are_fetched_once_for_the_fleet_and_every_shard_is_judged(tmp_path, isolated_state,
                                                                                 world, hub):
    store_uri = str(tmp_path / "store")
    # The defaults: ViT-B-32/openai for English, xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k for
    # the rest, each from where open_clip's pretrained table puts it on the hub. Their weights
    # here are random, so thresholds of -1 keep every judged pair (a run that keeps nothing fails).
    common = ["--wat", *wats(world), "--store", store_uri, "--until", "clip", "--allow-private-addresses",
              "--clip-batch-size", "16", "--min-similarity-en", "-1", "--min-similarity-other", "-1"]
    proc = run_cli("run", *common, env=hub_env(hub, tmp_path / "hf"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cache = cache_uri_of(store_uri)
    multilingual = "xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k"
    for name in ("ViT-B-32/openai", multilingual):
        assert f"model {name}: fetched into the model cache {cache}" in proc.stdout
    assert hub.gets(B32_REPO, B32_FILE) == 1 and hub.gets(XLMR_REPO, B32_FILE) == 1
    assert hub.gets(TOWER_REPO, "tokenizer.json") == 1 and hub.gets(TOWER_REPO, "config.json") == 1
    assert read_manifest(cache, "ViT-B-32/openai")["files"][0]["path"].endswith(B32_FILE)
    tower = {f["path"].rsplit("/", 1)[1] for f in read_manifest(cache, multilingual)["files"]}
    assert {B32_FILE, "config.json", "tokenizer.json", "tokenizer_config.json"} <= tower

    store = Store(store_uri)
    downloaded = {m["shard"]: m["stats"]["success"] for m in store.markers("download")}
    judged = {m["shard"]: m for m in store.markers("clip")}
    assert downloaded and set(judged) == set(downloaded) and sum(downloaded.values()) > 0
    models = set()
    for shard, marker in judged.items():
        rows = pq.read_table(io.BytesIO(store.read_bytes(layout.clip_shard(shard)))).to_pylist()
        assert len(rows) == marker["stats"]["samples"] == downloaded[shard]
        assert sum(marker["stats"]["judged_by"].values()) == len(rows)  # every sample had a caption here
        assert all(r["kept"] and r["similarity"] is not None for r in rows)
        models |= {r["model"] for r in rows if r["model"]}
    assert models == {"ViT-B-32/openai", multilingual}
    print("judged:", {s: m["stats"]["judged_by"] for s, m in judged.items()})

    # Run again on the same store: the cache answers, the hub is not asked again.
    again = run_cli("run", *common, env=hub_env(hub, tmp_path / "hf"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout
    assert hub.gets(B32_REPO, B32_FILE) == 1 and hub.gets(XLMR_REPO, B32_FILE) == 1


@pytest.mark.parametrize("how", ["--offline", "HF_HUB_OFFLINE=1"])
def test_offline_with_an_empty_cache_is_refused_before_any_download(tmp_path, isolated_state, world, hub, how):
    store_uri = str(tmp_path / "store")
    before = sum(hub.requests.values())
    extra = {"HF_HUB_OFFLINE": "1"} if how.startswith("HF_") else {}
    flags = ["--offline"] if how == "--offline" else []
    proc = run_cli("run", "--wat", *wats(world), "--store", store_uri, "--until", "clip",
                   "--allow-private-addresses", *flags, env=hub_env(hub, tmp_path / "empty-hf", **extra))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    cache = cache_uri_of(store_uri)
    lines = [line for line in proc.stderr.splitlines() if "is not in the model cache" in line]
    assert len(lines) == 2, proc.stderr
    assert f"`clipfleet models fetch ViT-B-32/openai --to {cache}`" in lines[0]
    assert "xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k" in lines[1]
    assert "Traceback" not in proc.stderr
    assert sum(hub.requests.values()) == before
    store = Store(store_uri)
    assert not store.exists("run.json") and not store.list("urls") and not store.list("images")
    assert not store.list("_markers")


def test_laion_heads_are_fetched_once_into_the_cache_and_named_by_their_cached_file(tmp_path, monkeypatch):
    import functools
    import hashlib
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import numpy as np

    from clipfleet.producer.preflight import PreflightError, preflight_heads
    from clipfleet.shared.models.heads import load_head
    from clipfleet.workers.registry import REGISTRY
    STAGES = REGISTRY.names()
    from clipfleet.shared.runconfig import RunConfig

    data = REPO / "tests" / "shared" / "data"
    served = tmp_path / "mirror"
    served.mkdir()
    (served / "clip_autokeras_nsfw_b32.zip").write_bytes((data / "autokeras_nsfw_b32.zip").read_bytes())
    asked = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            asked.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("CLIPFLEET_LAION_MIRROR", f"http://127.0.0.1:{server.server_address[1]}")

    def config():
        return RunConfig.make(store=str(tmp_path / "store"), until="tag", filter_model="shapes",
                              multilingual_filter_model="shapes", embed_model="shapes", punsafe_head="laion:nsfw-b32")

    try:
        with pytest.raises(PreflightError) as refused:
            preflight_heads(config(), STAGES, offline=True)
        assert str(refused.value) == (
            f"head laion:nsfw-b32 (--punsafe-head) is not in the model cache {tmp_path}/store/models, and this "
            f"run is offline: fetch it with `clipfleet models fetch laion:nsfw-b32 --to {tmp_path}/store/models`")
        assert asked == []
        cfg = config()
        preflight_heads(cfg, STAGES, offline=False)
        assert cfg.tag.punsafe_head == f"nsfw-b32:{tmp_path}/store/models/heads/nsfw-b32.pt"
        cfg_again = config()
        preflight_heads(cfg_again, STAGES, offline=True)  # now in the cache: offline is fine, nothing asked
        assert cfg_again.tag.punsafe_head == cfg.tag.punsafe_head and len(asked) == 1
    finally:
        server.shutdown()
        server.server_close()
    expected = np.load(data / "autokeras_nsfw_b32_expected.npz")
    np.testing.assert_allclose(load_head(cfg.tag.punsafe_head).score_embeddings(expected["probe"]),
                               expected["expected"], atol=1e-5)
    digest = hashlib.sha256((data / "autokeras_nsfw_b32.zip").read_bytes()).hexdigest()
    assert Store(str(tmp_path / "store" / "models")).read_json("heads/nsfw-b32.source.json")["sha256"] == digest
