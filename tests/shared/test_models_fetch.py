"""`clipfleet models fetch` against a model hub on loopback that speaks the hub's file protocol,
into a model cache on a local store and on S3; machines copy a model from the cache once."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from clipfleet.shared.models.cache import cache_uri_of, read_manifest, sha256_of
from clipfleet.shared.storage import Store
from tests.shared.hub_server import Hub, shapes_repo_files

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "clipfleet.producer.cli"]
SHAPES_REPO = "clipfleet-test/shapes"


@pytest.fixture
def hub(tmp_path):
    with Hub(tmp_path / "hub") as server:
        for name, path in shapes_repo_files(tmp_path / "shapes-repo").items():
            server.add_file(SHAPES_REPO, name, path)
        yield server


def env_for(hub: Hub, hf_home: Path, **more) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), **more})
    return env


def cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), cwd=REPO, capture_output=True, text=True, timeout=240, env=env)


SYNC_AND_EMBED = """
import sys, numpy as np, torch
from clipfleet.shared.models.cache import sync_model
from clipfleet.shared.models import load_clip
copied = sync_model(sys.argv[1], sys.argv[2])
model, preprocess, tokenizer = load_clip(sys.argv[1])
with torch.no_grad():
    text = model.encode_text(tokenizer(["a red circle", "a blue square"]))
print("copied", copied)
np.save(sys.argv[3], text.numpy())
"""


def test_fetch_hf_hub_repo_into_the_store_then_each_machine_copies_it_once(tmp_path, hub, store_uri):
    cache = cache_uri_of(store_uri)
    name = f"hf-hub:{SHAPES_REPO}"
    fetched = cli("models", "fetch", name, "--to", cache, env=env_for(hub, tmp_path / "producer-hf"))
    assert fetched.returncode == 0, fetched.stderr
    assert f"{name}: in {cache}" in fetched.stdout
    assert hub.gets(SHAPES_REPO, "open_clip_model.safetensors") == 1
    manifest = read_manifest(cache, name)
    files = {Path(f["path"]).name: f for f in manifest["files"]}
    assert set(files) == {"open_clip_config.json", "open_clip_model.safetensors"}
    served = hub.root / SHAPES_REPO / "open_clip_model.safetensors"
    assert files["open_clip_model.safetensors"]["sha256"] == sha256_of(served)
    assert files["open_clip_model.safetensors"]["size"] == served.stat().st_size
    # The store holds the files as a Hugging Face cache does, under the hub's commit.
    store = Store(cache)
    commit = hub.commit(SHAPES_REPO)
    assert store.read_bytes("hub/models--clipfleet-test--shapes/refs/main").decode() == commit
    assert store.exists(f"hub/models--clipfleet-test--shapes/snapshots/{commit}/open_clip_model.safetensors")

    # Fetching again finds the manifest: nothing is asked of the hub.
    again = cli("models", "fetch", name, "--to", cache, env=env_for(hub, tmp_path / "producer-hf"))
    assert again.returncode == 0, again.stderr
    assert hub.gets(SHAPES_REPO, "open_clip_model.safetensors") == 1

    # A worker machine (its own empty HF cache, the hub unreachable): three processes at once
    # copy the model from the store once between them, then load it with its real weights.
    worker_env = env_for(hub, tmp_path / "worker-hf", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1")

    def sync(i):
        return subprocess.run([sys.executable, "-c", SYNC_AND_EMBED, name, cache, str(tmp_path / f"t{i}.npy")],
                              cwd=REPO, capture_output=True, text=True, timeout=240, env=worker_env)

    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(sync, range(3)))
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    copies = sorted(int(r.stdout.split("copied ")[1].split()[0]) for r in runs)
    assert copies == [0, 0, 2]
    from clipfleet.shared.models import load_clip
    import torch
    model, _, tokenizer = load_clip("shapes")
    with torch.no_grad():
        expected = model.encode_text(tokenizer(["a red circle", "a blue square"])).numpy()
    for i in range(3):
        np.testing.assert_allclose(np.load(tmp_path / f"t{i}.npy"), expected, atol=1e-5)
    assert hub.gets(SHAPES_REPO, "open_clip_model.safetensors") == 1


def test_fetch_names_what_the_hub_lacks_and_offline_uses_only_the_local_cache(tmp_path, hub):
    cache = str(tmp_path / "store" / "models")
    missing = cli("models", "fetch", "hf-hub:clipfleet-test/nothing-here", "--to", cache,
                  env=env_for(hub, tmp_path / "hf"))
    assert missing.returncode == 1
    assert "hf-hub:clipfleet-test/nothing-here" in missing.stderr
    assert "open_clip_config.json" in missing.stderr and "Traceback" not in missing.stderr
    offline = cli("models", "fetch", f"hf-hub:{SHAPES_REPO}", "--to", cache, "--offline",
                  env=env_for(hub, tmp_path / "hf"))
    assert offline.returncode == 1
    assert "offline" in offline.stderr and sum(hub.requests.values()) == 1  # the missing repo's one HEAD
    assert read_manifest(cache, f"hf-hub:{SHAPES_REPO}") is None
    # Once this machine's cache has it, offline fetching fills the model cache without the hub.
    online = cli("models", "fetch", f"hf-hub:{SHAPES_REPO}", "--to", str(tmp_path / "other"),
                 env=env_for(hub, tmp_path / "hf"))
    assert online.returncode == 0, online.stderr
    asked = sum(hub.requests.values())
    offline = cli("models", "fetch", f"hf-hub:{SHAPES_REPO}", "--to", cache, "--offline",
                  env=env_for(hub, tmp_path / "hf"))
    assert offline.returncode == 0, offline.stderr
    assert sum(hub.requests.values()) == asked
    assert read_manifest(cache, f"hf-hub:{SHAPES_REPO}")["offline_fetch"] is True


def test_fetch_needs_a_cache_and_says_local_models_need_nothing(tmp_path, hub):
    nowhere = cli("models", "fetch", "shapes", env=env_for(hub, tmp_path / "hf"))
    assert nowhere.returncode == 2 and "--to URI" in nowhere.stderr
    local = cli("models", "fetch", "shapes", "--to", str(tmp_path / "c"), env=env_for(hub, tmp_path / "hf"))
    assert local.returncode == 0 and "shapes: local, nothing to fetch" in local.stdout
    assert sum(hub.requests.values()) == 0


def test_loading_is_offline_and_leaves_the_process_as_it_was(monkeypatch):
    """A worker's load never asks the hub (transformers' towers would), yet a fetch later in
    the same process still can."""
    import huggingface_hub.constants as hub_constants

    import clipfleet.shared.models as models
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    seen = []
    real = models._load_clip

    def spy(name, cache_dir):
        seen.append((os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE))
        return real(name, cache_dir)

    monkeypatch.setattr(models, "_load_clip", spy)
    with pytest.raises(models.ModelNotAvailable, match="clipfleet models fetch hf-hub:clipfleet-test/absent"):
        models.load_clip("hf-hub:clipfleet-test/absent")
    models.load_clip("shapes")
    assert seen == [("1", True), ("1", True)]
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE is False


def test_fetch_for_run_takes_the_models_of_the_stages_the_run_reaches(tmp_path, hub):
    from clipfleet.shared.runconfig import RunConfig
    store_uri = str(tmp_path / "store")
    RunConfig.make(store=store_uri, until="clip", filter_model="shapes",
                   multilingual_filter_model=f"hf-hub:{SHAPES_REPO}",
                   embed_model="hf-hub:clipfleet-test/not-reached").save(Store(store_uri))
    done = cli("models", "fetch", "--for-run", "--store", store_uri, env=env_for(hub, tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["shapes: local, nothing to fetch",
                                        f"hf-hub:{SHAPES_REPO}: in {store_uri}/models"]
    assert read_manifest(cache_uri_of(store_uri), f"hf-hub:{SHAPES_REPO}") is not None


def test_a_hugging_face_text_tower_brings_its_config_and_tokenizer_not_its_weights(tmp_path, hub, monkeypatch):
    # LAION's multilingual filter (xlm-roberta-base-ViT-B-32) loads XLM-R's config and tokenizer
    # through transformers; its weights come with open_clip's checkpoint.
    from clipfleet.shared.models.fetch import _tower_files
    for name, body in {"config.json": b'{"model_type": "xlm-roberta"}', "tokenizer.json": b"{}",
                       "sentencepiece.bpe.model": b"spm", "model.safetensors": b"w" * 64}.items():
        hub.add_file("FacebookAI/xlm-roberta-base", name, body)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    files = _tower_files({"hf_model_name": "FacebookAI/xlm-roberta-base",
                          "hf_tokenizer_name": "FacebookAI/xlm-roberta-base"}, False, "tower-test")
    assert sorted(Path(f["path"]).name for f in files) == ["config.json", "sentencepiece.bpe.model", "tokenizer.json"]
    assert all(f["path"].startswith(f"models--FacebookAI--xlm-roberta-base/snapshots/{hub.commit('FacebookAI/xlm-roberta-base')}/")
               for f in files)
    assert hub.gets("FacebookAI/xlm-roberta-base", "model.safetensors") == 0
