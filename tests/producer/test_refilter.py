"""`clipfleet refilter --keep-top-percent P` on a finished run (tests/producer/pipeline_store.py builds
it through the real stages): exactly P% of each bucket's judged samples across the shards, the best
ones, published without touching embeddings; twice in a row changes nothing; more than the run
embedded is refused before anything is written."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.storage import Store
from clipfleet.workers.clip.stage import bucket
from clipfleet.workers.tag.publish import read_tar
from tests.producer.pipeline_store import built_run, report_world, run_copy  # noqa: F401 (fixtures)
from tests.producer.test_card import real_run

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "clipfleet.producer.cli"]


def refilter(store_dir: Path, percent) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["refilter", "--store", str(store_dir), "--keep-top-percent", str(percent)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def files(directory: Path) -> dict[str, tuple[int, str]]:
    """Every file under `directory`: (mtime_ns, sha256)."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def judged(store_dir: Path) -> dict[str, list[tuple[float, str]]]:
    """bucket -> (similarity, key) of every judged sample of the run."""
    store, out = Store(str(store_dir)), {}
    for name in store.done("clip"):
        shard = int(name)
        languages = {r["key"]: r["language"] for r in pq.read_table(store_dir / layout.image_shard(shard, "parquet"),
                                                                    columns=["key", "language"]).to_pylist()}
        for r in pq.read_table(store_dir / layout.clip_shard(shard)).to_pylist():
            if r["similarity"] is not None:
                out.setdefault(bucket(languages[r["key"]]), []).append((r["similarity"], r["key"]))
    return out


def published(store_dir: Path) -> set[str]:
    return {k for p in (store_dir / "dataset").glob("*.parquet") for k in pq.read_table(p).column("key").to_pylist()}


def test_refilter_keeps_exactly_the_top_percent_per_bucket_once(run_copy):
    store_dir = run_copy
    scores = judged(store_dir)
    assert set(scores) == {"en", "other"}  # both buckets, so per-bucket is what is tested
    embeddings_before = files(store_dir / "embeddings")
    tags_before = files(store_dir / "tags")

    proc = refilter(store_dir, 30)
    assert proc.returncode == 0, proc.stderr
    kept = published(store_dir)
    for name, rows in scores.items():
        mine = [(s, k) for s, k in rows if k in kept]
        assert len(mine) == round(len(rows) * 0.3), name  # exact, across the shards
        assert min(mine)[0] >= max(s for s, k in rows if k not in kept), name  # the best ones
        assert f"{name}: kept {len(mine)} of {len(rows)} judged samples" in proc.stdout
    assert len(kept) == sum(round(len(r) * 0.3) for r in scores.values())
    for tar in (store_dir / "dataset").glob("*.tar"):  # the tars hold what the parquet does
        with open(tar, "rb") as f:
            keys = {n.split(".")[0] for n, _ in read_tar(f)}
        assert keys == set(pq.read_table(tar.with_suffix(".parquet")).column("key").to_pylist())
    hashes = {k: h for p in (store_dir / "images").glob("*.parquet")
              for k, h in zip(*pq.read_table(p, columns=["key", "phash"]).to_pydict().values())}
    for p in (store_dir / "dataset").glob("*.parquet"):  # rewritten shards keep download's perceptual hash
        for row in pq.read_table(p, columns=["key", "phash"]).to_pylist():
            assert row["phash"] is not None and row["phash"] == hashes[row["key"]]
    assert files(store_dir / "embeddings") == embeddings_before and files(store_dir / "tags") == tags_before
    card = (store_dir / layout.DATASET_CARD).read_text()
    assert f"in `dataset/` now: {len(kept):,}." in card
    assert "`clipfleet refilter --keep-top-percent 30.0`" in card

    # Search serves what is published: the ids refilter left out are never returned.
    import numpy as np
    from clipfleet.shared.serving import ServingIndex
    index = ServingIndex.open(Store(str(store_dir)))
    assert index.ntotal == len(kept)
    queries = np.concatenate([np.load(p) for p in sorted((store_dir / "embeddings" / "img_emb").glob("*.npy"))])
    _, found = index.search(queries.astype(np.float32), index.ntotal)
    served = {layout.split_id(i) for i in found.ravel().tolist() if i >= 0}
    keys = {}
    for shard in {s for s, _ in served}:
        keys[shard] = pq.read_table(store_dir / layout.embedding_metadata(shard)).column("key").to_pylist()
    assert {keys[s][r] for s, r in served} == kept

    everything = files(store_dir)
    again = refilter(store_dir, 30)
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout + again.stderr
    assert files(store_dir) == everything  # not a byte, not a timestamp

    wider = refilter(store_dir, 50)
    assert wider.returncode == 0, wider.stderr
    assert len(published(store_dir)) == sum(round(len(r) * 0.5) for r in scores.values())


def test_refilter_refuses_samples_the_run_never_embedded(run_copy):
    before = files(run_copy)
    proc = refilter(run_copy, 100)  # the run's threshold dropped some: they have no embeddings
    assert proc.returncode != 0 and "never embedded" in proc.stderr, proc.stdout + proc.stderr
    assert files(run_copy) == before


def test_a_run_with_keep_top_percent_publishes_that_share_of_each_bucket_across_its_shards(tmp_path):
    store_dir, out = real_run(tmp_path, "--keep-top-percent", "40")
    scores, kept = judged(store_dir), published(store_dir)
    assert len(list((store_dir / "dataset").glob("*.parquet"))) > 1  # the share is the run's, not a shard's
    for name, rows in scores.items():
        assert len([k for _, k in rows if k in kept]) == round(len(rows) * 0.4), name
    assert f"keep-top-percent 40.0: {len(kept)} samples published" in out
    assert f"in `dataset/` now: {len(kept):,}." in (store_dir / layout.DATASET_CARD).read_text()


def test_refilter_waits_for_the_whole_run(run_copy):
    shutil.rmtree(run_copy / "_state")  # a cache of the markers; without it the store is read as it is
    (run_copy / "_markers" / "tag" / "00001.json").unlink()  # shard 1 not tagged yet
    proc = refilter(run_copy, 30)
    assert proc.returncode != 0 and "has not published every shard yet" in proc.stderr, proc.stdout + proc.stderr
