"""run.json is standard JSON, and its sections come from the stage registry."""
from __future__ import annotations

import json

import pytest

from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from clipfleet.workers.registry import REGISTRY


def _refuse(name):
    raise ValueError(f"not standard JSON: {name}")


def test_run_json_is_standard_json_with_null_for_no_limit(tmp_path):
    store = Store(str(tmp_path))
    RunConfig.make(store.uri, inputs=["a.parquet"], input_kind="urls").save(store)
    raw = json.loads((tmp_path / "run.json").read_text(), parse_constant=_refuse)
    assert raw["download"]["max_aspect_ratio"] is None
    assert {name for name in raw if name in REGISTRY} == {s.name for s in REGISTRY if s.options is not None}
    assert RunConfig.load(store).same_work(RunConfig.from_dict(raw))


def test_a_number_that_is_not_json_is_refused_not_written(tmp_path):
    store = Store(str(tmp_path))
    cfg = RunConfig.make(store.uri, max_aspect_ratio=3.0)
    cfg.download.max_aspect_ratio = float("inf")
    with pytest.raises(ValueError, match="Out of range float"):
        cfg.save(store)
    assert not (tmp_path / "run.json").exists()


def test_options_route_to_their_stage_and_unknown_ones_are_refused():
    cfg = RunConfig.make("s", image_size=128, clip_batch_size=8, shard_size=5)
    assert (cfg.download.image_size, cfg.clip.clip_batch_size, cfg.input.shard_size) == (128, 8, 5)
    assert cfg.stages == REGISTRY.chain("wat")
    with pytest.raises(TypeError, match="unknown run option 'image_sizes'"):
        RunConfig.make("s", image_sizes=1)
