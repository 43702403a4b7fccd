"""The store behaves the same on a local directory and over the S3 protocol."""
from __future__ import annotations

import pytest

from clipfleet.shared.storage import Store, StoreError


def test_commit_publishes_outputs_then_marker(store_uri, tmp_path):
    store = Store(store_uri)
    (tmp_path / "a.parquet").write_bytes(b"rows")
    (tmp_path / "a.tar").write_bytes(b"x" * 100_000)
    marker = store.commit("download", 7, {"images/00007.parquet": tmp_path / "a.parquet",
                                          "images/00007.tar": tmp_path / "a.tar"}, {"stats": {"ok": 2}})
    assert store.read_bytes("images/00007.parquet") == b"rows"
    assert store.read_bytes("images/00007.tar") == b"x" * 100_000
    assert store.marker("download", 7)["stats"] == {"ok": 2}
    assert marker["outputs"] == ["images/00007.parquet", "images/00007.tar"]
    assert store.done("download") == {"00007"}
    assert store.done("extract") == set()
    assert store.list("images") == ["00007.parquet", "00007.tar"]


def test_failed_commit_leaves_no_marker_and_no_partial_file(store_uri, tmp_path):
    store = Store(store_uri)
    (tmp_path / "ok.bin").write_bytes(b"complete")
    with pytest.raises(FileNotFoundError):
        store.commit("download", 3, {"images/00003.parquet": tmp_path / "ok.bin",
                                     "images/00003.tar": tmp_path / "missing.tar"}, {})
    assert store.marker("download", 3) is None
    assert store.done("download") == set()
    assert not store.exists("images/00003.tar")
    # Whatever did land is whole, and no temporary name is left visible to a listing.
    assert all(not name.endswith(".tmp") for name in store.list("images"))


def test_recommit_is_idempotent(store_uri, tmp_path):
    store = Store(store_uri)
    (tmp_path / "f").write_bytes(b"same")
    for _ in range(2):
        store.commit("extract", 1, {"urls/01000.parquet": tmp_path / "f"}, {"stats": {"pairs": 1}})
    assert store.list("urls") == ["01000.parquet"]
    assert len(store.markers("extract")) == 1


def test_deadletter_records_are_listed(store_uri):
    store = Store(store_uri)
    store.write_deadletter("download", 5, {"error": "HTTPError: boom"})
    [record] = store.deadletters("download")
    assert record["shard"] == 5 and record["error"] == "HTTPError: boom"
    assert store.deadletters("extract") == []


def test_json_roundtrip_and_missing_files(store_uri):
    store = Store(store_uri)
    store.write_json("run.json", {"until": "extract", "inputs": ["a.wat.gz"]})
    assert store.read_json("run.json")["inputs"] == ["a.wat.gz"]
    assert store.marker("extract", 0) is None
    assert store.list("nothing-here") == []
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope.json")


def test_open_for_write_is_refused(store_uri):
    with pytest.raises(ValueError, match="atomic"):
        Store(store_uri).open("x", "wb")


def test_writable_store_passes_check(store_uri):
    store = Store(store_uri)
    store.check_writable()
    assert store.list("") == []  # the probe leaves nothing behind


def test_store_under_a_file_is_reported(tmp_path):
    # A path whose parent is a regular file cannot be a directory, for root too.
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not writable"):
        Store(str(tmp_path / "file" / "store")).check_writable()


def test_missing_bucket_is_reported(s3_server):
    with pytest.raises(StoreError, match="not writable"):
        Store("s3://no-such-bucket-clipfleet/run").check_writable()
