"""What `up` and `worker` say at start-up about the models of their queues."""
from __future__ import annotations

import pytest

from clipfleet.producer.model_check import model_lines
from clipfleet.shared.models.cache import cache_uri_of, upload
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store


def test_lines_follow_the_run_in_the_store_and_its_model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))  # nothing on this machine
    store_uri = str(tmp_path / "store")
    RunConfig.make(store=store_uri, filter_model="ViT-B-32/openai", multilingual_filter_model="shapes",
                   embed_model="ViT-B-16/openai").save(Store(store_uri))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x" * 10)
    upload(cache_uri_of(store_uri), "ViT-B-32/openai",
           [{"area": "hub", "path": "models--t--b32/snapshots/" + "a" * 40 + "/w.safetensors", "local": weights}])
    lines = model_lines(["cpu-download", "gpu-clip", "gpu-embed"], store_uri)
    assert lines == [
        f"gpu-clip: model ViT-B-32/openai: in the model cache {store_uri}/models",
        "gpu-clip: model shapes: local",
        "gpu-embed: model ViT-B-16/openai: not fetched yet; `clipfleet run` fetches it before its first "
        f"task, or `clipfleet models fetch ViT-B-16/openai --to {store_uri}/models`"]


def test_without_a_store_the_defaults_are_checked_and_a_bad_name_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    lines = model_lines(["gpu-embed", "tagging"])
    assert lines == ["gpu-embed: model ViT-L-14/openai: not fetched yet; `clipfleet run` fetches it before "
                     "its first task, or `clipfleet models fetch ViT-L-14/openai --to STORE/models`"]
    store_uri = str(tmp_path / "store")
    RunConfig.make(store=store_uri, embed_model="ViT-B-32/no-such-tag").save(Store(store_uri))
    with pytest.raises(ValueError, match="no-such-tag"):
        model_lines(["gpu-embed"], store_uri)
