"""Claims across Redis nodes: a list of nodes partitioned by digest, and a 3-node Redis Cluster on
loopback with a node SIGKILLed and restarted (from its AOF) in the middle of a segment."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis
from redis.crc import key_slot

from clipfleet.shared.pipeline import TransientError
from clipfleet.shared.runconfig import RunConfig
from clipfleet.workers.extract import stage as extract
from clipfleet.workers.extract.dedup import RunDedup, url_digest
from clipfleet.workers.extract.dedup_nodes import GROUPS, ClaimNodes, connect, group_tag
from clipfleet.workers.extract.stage import ExtractStage
from tests.conftest import redis_server
from tests.helpers import run_direct
from tests.rediscluster import redis_cluster
from tests.workers.extract.watfile import img, response_record, write_wat

POOL = [f"http://example.org/pool/{i}.jpg" for i in range(1000)]


def _wats(tmp_path: Path, segments: int = 6) -> list[str]:
    """Segment s links POOL[150 s .. 150 s + 300) (wrapping): each URL in two segments, and the
    last segment shares 50 URLs with the first."""
    files = []
    for seg in range(segments):
        urls = [POOL[(150 * seg + j) % len(POOL)] for j in range(300)]
        records = [response_record(f"http://example.org/s{seg}/page{p}.html",
                                   [img(u, f"a picture from segment {seg}") for u in urls[p * 30:(p + 1) * 30]])
                   for p in range(10)]
        path = tmp_path / f"seg{seg}.wat.gz"
        write_wat(path, records)
        files.append(str(path))
    return files


def _extract(stage: ExtractStage, segment: int, wat: str, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    result, _ = run_direct(stage, None, segment, out, wat=wat)
    return [r["url"] for f in sorted(result.files.values()) for r in pq.read_table(f).to_pylist()]


def test_group_tags_spread_over_the_slot_ranges():
    slots = [key_slot(group_tag(g).encode()) for g in range(GROUPS)]
    assert [s * GROUPS // 16384 for s in slots] == list(range(GROUPS))
    # the key names of every run ever made depend on these: fixed for every release
    assert [group_tag(g) for g in (0, 1, 2, 3, 63)] == ["10", "18", "113", "342", "40"]


def test_the_option_is_checked_when_the_run_is_made(tmp_path):
    for bad, message in ((("http://127.0.0.1:1",), "not a redis://"),
                         (("redis://127.0.0.1:1", "redis://127.0.0.1:1"), "listed twice")):
        with pytest.raises(ValueError, match=f"--dedup-redis: .*{message}"):
            RunConfig.make(store=str(tmp_path), dedup_redis=bad)
    cfg = RunConfig.make(store=str(tmp_path), dedup_redis=("redis://127.0.0.1:1", "unix:///tmp/r.sock"))
    assert cfg.extract.dedup_redis == ("redis://127.0.0.1:1", "unix:///tmp/r.sock")


def test_unreachable_nodes_make_the_segment_transient(tmp_path):
    wats = _wats(tmp_path, 1)
    cfg = RunConfig.make(store=str(tmp_path / "store"), inputs=wats, dedup_redis=("redis://127.0.0.1:1",))
    with pytest.raises(TransientError, match="no --dedup-redis node answers"):
        _extract(ExtractStage(cfg), 0, wats[0], tmp_path / "out")


def test_nodes_partitioned_by_digest(tmp_path):
    wats = _wats(tmp_path)
    with redis_server(tmp_path) as one, redis_server(tmp_path) as two:
        cfg = RunConfig.make(store=str(tmp_path / "store"), inputs=wats, dedup_redis=(one, two))
        stage = ExtractStage(cfg)  # no client given: the run's --dedup-redis
        assert stage.dedup.nodes.cluster is None and len(stage.dedup.nodes.clients) == 2
        rows = {s: _extract(stage, s, wats[s], tmp_path / f"o{s}") for s in range(6)}
        assert _extract(stage, 3, wats[3], tmp_path / "again") == rows[3]  # redelivered: the same rows
        urls = Counter(u for r in rows.values() for u in r)
        assert set(urls) == set(POOL) and set(urls.values()) == {1}
        # each node holds exactly the groups that fall to it, and nothing is on the broker's side
        for i, url in enumerate((one, two)):
            keys = [k.decode() for k in redis.Redis.from_url(url).scan_iter("cf:dedup:*")]
            tags = {k[k.index("{") + 1:k.index("}")] for k in keys}
            assert tags and tags <= {group_tag(g) for g in range(GROUPS) if g % 2 == i}
        owners = {u: s for s, r in rows.items() for u in r}
        assert all(stage.dedup.owner_of(url_digest(u)) == owners[u] for u in POOL)


def test_cluster_with_a_node_restarted_mid_segment(tmp_path, monkeypatch):
    """Segments 0-1 claim; node 1 is SIGKILLed during segment 2 (the segment fails as transient
    and is delivered again once the node is back from its AOF); 3-5 follow, 5 sharing URLs with
    0; 0 is delivered again at the end. Every URL kept once, none lost, owners as written."""
    monkeypatch.setattr(extract, "CLAIM_BATCH", 20)  # 15 claim calls a segment
    wats = _wats(tmp_path)
    with redis_cluster(tmp_path / "cluster", nodes=3) as cluster:
        cfg = RunConfig.make(store=str(tmp_path / "store"), inputs=wats, dedup_redis=tuple(cluster.urls[:1]))
        stage = ExtractStage(cfg)
        assert stage.dedup.nodes.cluster is not None  # found from one node that says it is a cluster
        rows = {s: _extract(stage, s, wats[s], tmp_path / f"o{s}") for s in (0, 1)}
        on_node1 = cluster.client(1).dbsize()
        assert on_node1 > 0  # node 1 holds claims of segments 0 and 1 when it is killed

        claim, calls = stage.dedup.claim, []

        def claim_then_kill(digests, owner):
            calls.append(owner)
            if len(calls) == 5:
                cluster.kill(1)
            return claim(digests, owner)

        monkeypatch.setattr(stage.dedup, "claim", claim_then_kill)
        with pytest.raises(TransientError):
            _extract(stage, 2, wats[2], tmp_path / "o2-failed")
        monkeypatch.setattr(stage.dedup, "claim", claim)
        assert len(calls) >= 5
        cluster.restart(1)
        assert cluster.client(1).dbsize() >= on_node1  # its AOF brought back every claim it held

        for s in (2, 3, 4, 5):
            rows[s] = _extract(stage, s, wats[s], tmp_path / f"o{s}")
        assert _extract(stage, 0, wats[0], tmp_path / "o0-again") == rows[0]
        urls = Counter(u for r in rows.values() for u in r)
        assert set(urls) == set(POOL)             # nothing lost
        assert set(urls.values()) == {1}          # nothing claimed twice
        # 5 links 750..1049: 750..899 are 4's, 0..49 stay 0's through the restart
        assert sorted(rows[5]) == sorted(POOL[900:])
        owners = {u: s for s, r in rows.items() for u in r}
        assert all(stage.dedup.owner_of(url_digest(u)) == owners[u] for u in POOL)
        assert all(cluster.client(i).dbsize() > 0 for i in range(3))


def test_claim_nodes_take_one_kind_of_backend():
    with pytest.raises(ValueError):
        ClaimNodes()
    assert isinstance(RunDedup(redis.Redis(port=1), "cf:dedup:x", bits=8).nodes, ClaimNodes)
    with pytest.raises(ValueError, match="no URL"):
        connect(())


def test_a_run_claims_on_the_cluster_it_is_given(sandbox, tmp_path):
    """`clipfleet run --until extract --dedup-redis <a cluster node>` with its own fleet: the
    worker processes claim every URL on the cluster (none in the broker), each kept once."""
    import os
    import subprocess
    import sys

    from clipfleet.shared.storage import Store
    with redis_cluster(tmp_path / "cluster", nodes=3) as cluster:
        store_uri = str(tmp_path / "store")
        proc = subprocess.run(
            [sys.executable, "-m", "clipfleet.producer.cli", "run", "--wat", *sandbox.wats, "--store", store_uri,
             "--until", "extract", "--dedup-redis", cluster.urls[2]],
            env={**os.environ, "CLIPFLEET_STATE_DIR": str(tmp_path / "state")}, capture_output=True, text=True,
            timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        store = Store(store_uri)
        rows = [r for name in store.list("urls") for r in pq.read_table(store.path(f"urls/{name}")).to_pylist()]
        urls = Counter(r["url"] for r in rows)
        assert set(urls) == {t["url"] for t in sandbox.truth} and set(urls.values()) == {1}
        records = sum(len(page) // 7 for i in range(3) for key in cluster.client(i).scan_iter("cf:dedup:*")
                      for page in cluster.client(i).hvals(key))
        assert records == len(rows)  # one claim per kept URL, all of them on the cluster
        assert RunConfig.load(store).extract.dedup_redis == (cluster.urls[2],)
