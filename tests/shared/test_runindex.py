"""The run state kept in Redis equals the markers: recorded as markers commit, once each, and
rebuilt from the markers alone after a flush; the store path (per-stage summaries) says the same."""
from __future__ import annotations

import json
import subprocess
import sys

import redis

from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.runindex import RunIndex
from clipfleet.shared.runstate import RunState
from clipfleet.shared.storage import Store

STAGES = ["extract", "download", "clip"]


def a_run(tmp_path) -> tuple[Store, RunConfig, list[tuple[str, str | None, dict]]]:
    """Three WAT segments: 0 and 1 extracted into URL shards 1000-1001 and 2000; shard 1000
    downloaded and judged, 1001 downloaded, 2000 dead-lettered at download; segment 2 pending."""
    store = Store(str(tmp_path / "store"))
    cfg = RunConfig.make(store.uri, inputs=["a", "b", "c"], input_kind="wat", until="clip")
    cfg.save(store)
    committed = []

    def commit(stage, shard, nxt, n_in, n_out, stats, dropped=()):
        marker = store.commit(stage, shard, {}, {"stats": stats, "samples_in": n_in, "samples_out": n_out,
                                                 "dropped": list(dropped), "next_shards": nxt,
                                                 "started_at": 1000.0 + shard, "duration_s": 2.0})
        committed.append((stage, {"extract": "download", "download": "clip"}.get(stage), marker))

    commit("extract", 0, [1000, 1001], 50, 40, {"img_links": 50, "pairs": 40, "drop_no_alt": 10}, ["drop_no_alt"])
    commit("extract", 1, [2000], 30, 20, {"img_links": 30, "pairs": 20, "drop_no_alt": 10}, ["drop_no_alt"])
    commit("download", 1000, [1000], 20, 15, {"count": 20, "success": 15, "refused": {"robots.txt": 5}},
           ["refused"])
    commit("download", 1001, [1001], 20, 18, {"count": 20, "success": 18, "refused": {"robots.txt": 1,
                                                                                     "tdmrep.json": 1}},
           ["refused"])
    store.write_deadletter("download", 2000, {"error": "ValueError: bad shard"})
    commit("clip", 1000, [1000], 15, 9, {"samples": 15, "kept": 9, "dropped": {"below threshold": 6}},
           ["dropped"])
    return store, cfg, committed


def view(states) -> list[tuple]:
    return [(s.stage, s.n_expected, s.n_done, s.n_failed, s.complete, s.samples_in, s.samples_out,
             s.samples_done, s.totals, s.drop_reasons(), sorted(s.pending), s.work_s) for s in states]


def test_recorded_state_equals_the_markers_and_a_flush_is_rebuilt_from_them(tmp_path, redis_url):
    store, cfg, committed = a_run(tmp_path)
    client = redis.Redis.from_url(redis_url)
    index = RunIndex(client, store.uri, cfg.created_at)
    from_store = view(RunState(store, cfg).all())
    assert from_store[0][:5] == ("extract", 3, 2, 0, False)
    assert from_store[1][:8] == ("download", 3, 2, 1, False, 40, 33, 40)
    assert from_store[1][9] == [("refused: robots.txt", 6), ("refused: tdmrep.json", 1)]
    assert from_store[2][10] == ["01001"]

    # As the workers record them (each twice: a redelivered task records nothing twice).
    for stage, nxt, marker in committed + committed:
        index.record(stage, nxt, marker)
    index.record_failed("download", 2000)
    index.set_first("extract", ["00000", "00001", "00002"])
    client.set(index.key("built"), "test")
    assert view(RunState(store, cfg, index=index).all()) == from_store

    client.flushall()  # lost: the next reader rebuilds it from the markers alone
    assert view(RunState(store, cfg, index=index).all()) == from_store
    assert client.get(index.key("built")) == b"markers"

    # A shard done after its dead letter leaves the failed set; the store says the same.
    store.commit("download", 2000, {}, {"stats": {"count": 20, "success": 20}, "samples_in": 20,
                                        "samples_out": 20, "next_shards": [2000], "duration_s": 1.0})
    index.record("download", "clip", store.marker("download", 2000))
    store.fs.rm(store.path("_deadletter/download/02000.json"))
    assert view(RunState(store, cfg, index=index).all()) == view(RunState(store, cfg).all())


def test_the_store_path_reads_each_marker_once_into_summaries(tmp_path):
    store, cfg, _ = a_run(tmp_path)
    first = view(RunState(store, cfg).all())
    summary = json.loads((tmp_path / "store" / "_state" / "download.json").read_text())
    assert sorted(summary["shards"]) == ["01000", "01001"] and summary["totals"]["success"] == 33
    reads = []
    real = store.read_json
    store.read_json = lambda rel: reads.append(rel) or real(rel)
    import clipfleet.shared.runstate as runstate
    runstate._MARKERS.clear()  # a new process: only the summaries remember
    assert view(RunState(store, cfg).all()) == first
    assert not [r for r in reads if r.startswith("_markers/")], reads


def test_status_rebuild_with_a_broker_equals_status_from_the_markers(tmp_path, redis_url):
    store, cfg, _ = a_run(tmp_path)

    def status(*extra):
        proc = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "status", "--store", store.uri,
                               "--json", "--no-recover", *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        stages = json.loads(proc.stdout)["stages"]
        keep = ("expected", "done", "failed", "samples_done", "samples_out", "samples_expected", "totals")
        return {s: {k: v[k] for k in keep} for s, v in stages.items()}

    from_markers = status()
    assert from_markers["download"]["totals"]["refused"] == {"robots.txt": 6, "tdmrep.json": 1}
    assert status("--broker", redis_url, "--rebuild") == from_markers
    assert status("--broker", redis_url) == from_markers


def test_a_finished_run_is_sealed_and_read_without_listing_until_it_is_taken_further(tmp_path):
    from clipfleet.producer.register import register
    store = Store(str(tmp_path / "store"))
    cfg = RunConfig.make(store.uri, inputs=["in.parquet"], input_kind="urls", until="download")
    cfg.save(store)
    for shard in range(3):
        store.write_bytes(f"urls/{shard:05d}.parquet", b"")
        store.commit("download", shard, {}, {"stats": {"success": 4}, "samples_in": 5, "samples_out": 4,
                                             "next_shards": [shard], "duration_s": 1.0})
    listed = view(RunState(store).all())
    assert RunState(store).seal()
    lists = []
    real = store.list
    store.list = lambda rel: lists.append(rel) or real(rel)
    assert view(RunState(store).all()) == listed and lists == []
    store.list = real

    # Taken further: the seal goes, and the new stage's shards are listed and counted.
    register(store, RunConfig.make(store.uri, inputs=["in.parquet"], input_kind="urls", until="clip"))
    store.commit("clip", 0, {}, {"stats": {}, "samples_in": 4, "samples_out": 2, "next_shards": [0]})
    states = RunState(store).all()
    assert (states[1].stage, states[1].n_expected, states[1].n_done, states[1].samples_out) == ("clip", 3, 1, 2)
    assert not RunState(store).seal()
