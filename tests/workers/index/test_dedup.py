"""Near-duplicate groups across a run: the sandbox world's pictures, and copies of each (re-encoded at
quality 40, shrunk to half, cropped by 3%) at their own URLs and captions in other shards. Perceptual
hashes are download's, of the real files; the image embeddings are the index tests' synthetic ones,
a copy's its original's moved as CLIP moves a re-encoded picture (cosine ~0.98). The index tasks
run as a fleet would run them (conftest.drive), dedup after the merge."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.shared import layout
from clipfleet.shared.pipeline import Stats, execute
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from clipfleet.workers.download.phash import phash_bytes
from clipfleet.workers.index import neardup
from clipfleet.workers.index.dedup import DedupIndex
from clipfleet.workers.index.plan import DEDUP_GROUPS, DEDUP_INFO, settled
from tests.workers.download.conftest import truth, world  # noqa: F401 (fixtures: the sandbox world)
from tests.workers.download.test_phash import KINDS, copies, original
from tests.workers.index.conftest import World, add_shard, drive, make_run, mark, normalise

SHARDS = 4  # originals spread over every shard, each copy in another shard than its original


def put(store: Store, rel: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(rel, buf.getvalue())


def build(store: Store, world, truth, space: World) -> dict[str, str]:
    """The run as the stages up to tag leave it; returns {copy key: its original's key}."""
    urls = truth.column("url").to_pylist()
    pictures = space.vectors(len(urls), 1).astype(np.float32)
    rng = np.random.default_rng(11)
    rows = {s: [] for s in range(SHARDS)}
    originals = {}
    for i, url in enumerate(urls):
        data = original(world, url)
        home = i % SHARDS
        rows[home].append((url, f"picture {i}", phash_bytes(data), pictures[i], None, 0.30 + 0.001 * (i % 7)))
        for n, (kind, copy) in enumerate(copies(data).items()):
            moved = pictures[i] + 0.12 * rng.standard_normal(pictures.shape[1]) / np.sqrt(pictures.shape[1])
            rows[(home + 1 + n) % SHARDS].append((f"http://127.0.0.1/copies/{i}-{kind}.jpg", f"a {kind} copy {i}",
                                                  phash_bytes(copy), moved, i, 0.29))
    for shard, samples in rows.items():
        keys = [f"{shard:05d}{r:04d}" for r in range(len(samples))]
        for key, sample in zip(keys, samples):
            if sample[4] is not None:
                originals[key] = sample[4]
            else:
                originals.setdefault(("picture", sample[1]), key)
        url, text, phash, x, _, sim = map(list, zip(*samples))
        buf = io.BytesIO()
        np.save(buf, normalise(np.stack(x)))
        store.write_bytes(layout.image_embeddings(shard), buf.getvalue())
        n = len(keys)
        put(store, layout.embedding_metadata(shard), pa.table({
            "key": keys, "url": url, "caption": text, "similarity": pa.array(sim, pa.float32()),
            "language": ["en"] * n, "width": pa.array([64] * n, pa.int32()), "height": pa.array([64] * n, pa.int32())}))
        put(store, layout.url_shard(shard), pa.table({"url": url, "caption": text}))
        put(store, layout.image_shard(shard, "parquet"), pa.table({"key": keys, "url": url, "phash": phash}))
        put(store, layout.dataset_shard(shard, "parquet"), pa.table({"key": keys, "URL": url, "TEXT": text}))
        mark(store, shard, n, space.dim)
    return {key: originals[("picture", f"picture {i}")] for key, i in originals.items() if isinstance(key, str)}


@pytest.fixture
def run(tmp_path, world, truth):  # noqa: F811
    store = make_run(str(tmp_path / "run"), index_key="IVF4,Flat", index_eval_queries=0)
    want = build(store, world, truth, World(dim=64, latent=32, seed=2))
    drive(store, range(SHARDS))
    return store, want


def published(store: Store) -> dict[str, str | None]:
    out = {}
    for s in range(SHARDS):
        table = pq.read_table(io.BytesIO(store.read_bytes(layout.dataset_shard(s, "parquet"))))
        out.update(zip(table.column("key").to_pylist(), table.column("duplicate_of").to_pylist()))
    return out


def test_copies_name_their_originals_group_and_distinct_pictures_stay_apart(run, truth):  # noqa: F811
    store, want = run
    assert settled(store)
    groups = pq.read_table(io.BytesIO(store.read_bytes(DEDUP_GROUPS))).to_pylist()
    group_of = {g["key"]: g["group"] for g in groups}
    originals = set(want.values())
    found = sum(group_of.get(c) is not None and group_of.get(c) == group_of.get(o) for c, o in want.items())
    kept = {g["group"] for g in groups}
    merged_originals = len(originals) - len({group_of.get(o, o) for o in originals})
    print(f"copies in their original's group: {found} of {len(want)}; distinct pictures merged: {merged_originals}")
    assert len(want) == len(KINDS) * len(originals) == 3 * truth.num_rows
    assert found >= 0.95 * len(want)
    assert merged_originals <= 0.02 * len(originals)
    marks = published(store)
    # the original has the highest CLIP similarity of its group, so it is kept; its copies name it
    assert sum(marks[c] == o for c, o in want.items()) >= 0.95 * len(want)
    assert sum(marks[o] is not None for o in originals) <= 0.02 * len(originals)
    assert len(kept) == store.read_json(DEDUP_INFO)["groups"] and store.read_json(DEDUP_INFO)["key"] == "g00001"
    from clipfleet.producer.report import build_report
    assert (f"near-duplicates: {len(kept)} groups holding {len(groups)} samples; {len(groups) - len(kept)} marked"
            in build_report(store))


def test_a_rerun_after_a_crash_gives_the_same_result_and_dropping_leaves_copies_out(run, tmp_path):
    store, want = run
    before = (store.read_bytes(DEDUP_GROUPS), published(store))
    # a worker killed after marking the dataset, before the commit: no record, no marker
    store.fs.rm(store.path(DEDUP_INFO))
    store.fs.rm(store.path(DEDUP_GROUPS))
    store.fs.rm(store.path("_markers/index-dedup"), recursive=True)
    task = DedupIndex(RunConfig.load(store))
    assert task.due(store) == "g00001" and not settled(store)
    marker = execute(task, store, "g00001")  # the redelivered task
    assert settled(store) and (store.read_bytes(DEDUP_GROUPS), published(store)) == before
    assert marker["stats"]["shards_rewritten"] == 0  # already marked: nothing rewritten
    assert task.due(store) is None

    cfg = RunConfig.load(store)
    cfg.index.drop_near_duplicates = True
    DedupIndex(cfg).run(store, "g00001", tmp_path, Stats())
    left = published(store)
    assert sum(c in left for c in want) <= 0.05 * len(want) and set(want.values()) <= set(left)
    assert all(d is None for d in left.values())


def test_phash_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=60, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, size=(60, 6)).astype(np.uint64)
    near = base.copy()
    for col in range(6):
        near ^= flips[:, col]
    hashes = np.concatenate([base, near])
    got = {tuple(p) for p in neardup.phash_pairs(hashes, np.ones(len(hashes), bool), 8).tolist()}
    d = neardup.popcount(hashes[:, None] ^ hashes[None, :])
    want = {(i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes)) if d[i, j] <= 8}
    assert got == want and len(want) >= 60


def test_components_are_union_find():
    rng = np.random.default_rng(1)
    pairs = rng.integers(0, 500, size=(300, 2))
    parent = list(range(500))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert neardup.components(500, pairs).tolist() == [find(i) for i in range(500)]


def _options(**given):
    from clipfleet.workers.index.options import IndexOptions
    return IndexOptions(**given)


def _histograms(bits: list[int], distances: list[float]) -> dict:
    from clipfleet.workers.embed.calibrate import COPY_BITS, COPY_DISTANCE, distance_label
    return {COPY_BITS: dict(Counter(f"{b:02d}" for b in bits)), COPY_DISTANCE: dict(Counter(map(distance_label, distances)))}


def test_calibration_takes_the_copies_thresholds_when_the_model_tells_copies_from_other_pictures():
    from clipfleet.workers.index.calibration import calibrate
    rng = np.random.default_rng(0)
    x = normalise(rng.standard_normal((500, 32)).astype(np.float32))  # distinct pictures: far apart
    hashes = rng.integers(0, 2**63, 500, dtype=np.int64).astype(np.uint64)
    found = calibrate(_options(), _histograms([1] * 30 + [5] * 70 + [9] * 5, [0.004] * 100 + [0.02] * 5),
                      x, np.zeros(500, np.int64), hashes, np.ones(500, bool))
    assert (found["hamming"], found["eps"], found["veto_bits"]) == (5, 0.005, 9)
    assert found["eps_from"] == "95% of copies" and found["distinct_distance_q01"] > 0.5


def test_calibration_turns_semantic_duplicates_off_for_a_model_that_puts_other_pictures_as_close_as_copies():
    from clipfleet.workers.index.calibration import calibrate
    rng = np.random.default_rng(0)
    shapes = normalise(rng.standard_normal((4, 32)).astype(np.float32))  # four kinds, pictures on top of each other
    x = normalise(shapes[rng.integers(0, 4, 400)] + 0.01 * rng.standard_normal((400, 32)).astype(np.float32))
    hashes = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64)
    found = calibrate(_options(), _histograms([3] * 20, [0.004] * 20), x, np.zeros(400, np.int64), hashes,
                      np.ones(400, bool))
    assert found["eps"] == 0.0 and found["eps_from"].startswith("off:")
    given = calibrate(_options(near_dup_eps=0.02, near_dup_hamming=3), {}, x, np.zeros(400, np.int64), hashes,
                      np.ones(400, bool))
    assert (given["eps"], given["hamming"], given["eps_from"]) == (0.02, 3, "--near-dup-eps")
    assert "veto_bits" not in given


def test_a_relation_loses_the_pairs_the_other_rules_out():
    from clipfleet.workers.index.calibration import confirmed
    x = normalise(np.array([[1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 1, 0.01]], np.float32))
    hashes = np.array([0, 0b1, 0b11, 0xFFFF_FFFF], np.uint64)
    has = np.ones(4, bool)
    by_phash = np.array([[0, 1], [1, 2]])  # 1 bit apart (a copy); 1 bit apart but the model says other pictures
    by_embedding = np.array([[0, 1], [2, 3]])  # close in both; close to the model but 30 bits apart
    kept_phash, kept_embedding, vetoed = confirmed(by_phash, by_embedding, x, hashes, has,
                                                   {"veto_bits": 4, "veto_distance": 0.01})
    assert kept_phash.tolist() == [[0, 1]] and kept_embedding.tolist() == [[0, 1]]
    assert vetoed == {"phash_pairs_vetoed": 1, "embedding_pairs_vetoed": 1}


def test_grouping_holds_one_shard_of_vectors_in_memory_not_the_run(tmp_path, monkeypatch):
    """index-dedup reads the run a shard at a time and compares one cluster at a time: four times
    the run grows its peak memory by far less than the vectors it added (before, it held them all,
    twice, as float32). And it finds exactly the pairs an all-in-memory comparison finds."""
    import tracemalloc

    from clipfleet.workers.index.dedup import find_groups
    monkeypatch.setattr(neardup, "KMEANS_POINTS", 2000)  # clusters of ~2000: quick to compare
    space, per_shard = World(dim=128, latent=16, clusters=200, seed=4), 6000

    def peak_of(shards: int):
        store = make_run(str(tmp_path / f"run{shards}"), index_key="Flat", index_eval_queries=0)
        x = np.concatenate([add_shard(store, space, s, per_shard, texts=False) for s in range(shards)])
        (tmp_path / f"scratch{shards}").mkdir()
        tracemalloc.start()
        _, thresholds = find_groups(store, list(range(shards)), RunConfig.load(store).index,
                                    {"dim": space.dim, "ivf": False}, tmp_path / f"scratch{shards}", Stats())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak, x, thresholds

    small, x, _ = peak_of(4)
    big, _, _ = peak_of(16)
    added = 12 * per_shard * space.dim * 4  # float32 bytes of the vectors the bigger run adds
    print(f"peak {small / 2**20:.1f} MiB, then {big / 2**20:.1f} MiB with {added / 2**20:.1f} MiB more vectors")
    assert big - small < 0.5 * added

    planted = x.copy()  # 200 copies, moved a little, among 24 000
    planted[5000:5200] = normalise(x[:200].astype(np.float32) + 0.01 * np.random.default_rng(1).standard_normal((200, 128)))
    unit, assigned = planted.astype(np.float32), neardup.clusters(planted)
    brute = {(int(m[i]), int(m[j])) for c in np.unique(assigned) for m in [np.nonzero(assigned == c)[0]]
             for i, j in zip(*np.nonzero(np.triu(unit[m] @ unit[m].T >= 1 - 0.02, 1)))}
    found = {tuple(p) for p in neardup.semantic_pairs(planted, assigned, 0.02).tolist()}
    assert found == brute and len(found) >= 150
