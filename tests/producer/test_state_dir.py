"""The embedded Redis's data directory is keyed by the store itself, not by how it was typed."""
from __future__ import annotations

from clipfleet.producer.fleet import canonical_store, state_dir


def test_one_store_typed_many_ways_has_one_state_dir(tmp_path, monkeypatch, isolated_state):
    (tmp_path / "checkout-a").mkdir()
    (tmp_path / "checkout-b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "checkout-a")
    monkeypatch.chdir(tmp_path / "checkout-a")
    here = state_dir("demo-store")
    assert state_dir("./demo-store/") == state_dir(str(tmp_path / "checkout-a" / "demo-store")) == here
    assert state_dir(str(tmp_path / "link" / "demo-store")) == here
    assert state_dir(f"file://{tmp_path}/checkout-a/demo-store") == here
    monkeypatch.chdir(tmp_path / "checkout-b")
    assert state_dir("demo-store") != here  # the same words in another checkout: another store
    assert here.is_dir() and here.parent.parent == isolated_state


def test_uris_are_compared_without_case_in_the_scheme_or_a_trailing_slash(isolated_state):
    assert canonical_store("S3://bucket/run/") == "s3://bucket/run"
    assert state_dir("s3://bucket/run/") == state_dir("s3://bucket/run")
    assert state_dir("s3://bucket/run") != state_dir("s3://bucket/other")
    assert state_dir(None) == state_dir(None) != state_dir("s3://bucket/run")
