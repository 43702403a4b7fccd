"""`clipfleet takedown`: removed from search and the published dataset, without a rebuild."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.workers.download.blocklist import Blocklist
from clipfleet.workers.index import vectors
from clipfleet.shared.serving import ServingIndex
from tests.workers.index.conftest import add_shard, drive, make_run, sample_key

REPO = Path(__file__).resolve().parents[3]


def write_tar(store, rel, keys):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key in keys:
            for ext, data in (("jpg", b"\xff\xd8" + key.encode()), ("txt", key.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    store.write_bytes(rel, buf.getvalue())


def tar_names(store, rel):
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(rel))) as tar:
        return tar.getnames()


def takedown(*args):
    return subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "takedown", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_taken_down_samples_are_never_returned_and_leave_the_published_dataset(store_uri, world, tmp_path):
    blocklist = tmp_path / "run-blocklist.txt"
    blocklist.write_text("# the run's own list\nhttp://example.invalid/old.jpg\n")
    store = make_run(store_uri, index_key="IVF16,Flat", blocklist=str(blocklist))
    for s in (0, 1):
        add_shard(store, world, s, 400)
        write_tar(store, layout.dataset_shard(s), [sample_key(s, r) for r in range(400)])
    drive(store, [0, 1])
    server = ServingIndex.open(store, refresh_s=0)   # a server running while the takedown happens
    index_before = store.read_bytes("index/" + store.read_json("index/infos.json")["index_file"][6:])

    # by URL: two samples of shard 0; by hash: one sample of shard 1 (its image's sha256)
    url_list = tmp_path / "urls.txt"
    meta0 = pq.read_table(io.BytesIO(store.read_bytes(layout.embedding_metadata(0)))).to_pylist()
    url_list.write_text(f"{meta0[5]['url']}\n{meta0[9]['url']}#fragment\nhttp://127.0.0.1/never-seen.jpg\n")
    sha = pq.read_table(io.BytesIO(store.read_bytes(layout.image_shard(1, "parquet")))).column("sha256").to_pylist()[33]
    hash_list = tmp_path / "hashes.txt"
    hash_list.write_text(f"sha256:{sha}\n")
    by_url = takedown("--store", store_uri, "--urls", str(url_list), "--reason", "DMCA 1234")
    assert by_url.returncode == 0, by_url.stderr
    assert "removed 2 samples" in by_url.stdout and "1 entries matched no sample" in by_url.stdout
    by_hash = takedown("--store", store_uri, "--hashes", str(hash_list), "--reason", "hash list")
    assert by_hash.returncode == 0, by_hash.stderr
    assert "removed 1 samples" in by_hash.stdout

    gone = [layout.global_id(0, 5), layout.global_id(0, 9), layout.global_id(1, 33)]
    queries = np.concatenate([vectors.load(store, 0)[[5, 9]], vectors.load(store, 1)[[33]]]).astype(np.float32)
    for index in (server, ServingIndex.open(store)):   # the running server follows; a fresh one too
        sims, ids = index.search(queries, 10)
        assert not np.isin(ids, gone).any()
        assert (ids >= 0).all()                        # still 10 results a row
        assert index.ntotal == 800 - 3
        # every other id still leads to its own metadata row
        for gid, row in zip(ids.ravel(), index.metadata(ids.ravel(), columns=["key"])):
            assert row["key"] == sample_key(*layout.split_id(gid))
    assert index.metadata(gone) == [None, None, None]

    # no rebuild: the serving index files are the same bytes
    assert store.read_bytes("index/" + store.read_json("index/infos.json")["index_file"][6:]) == index_before
    # published dataset: rows and tar members gone, the rest intact
    for shard, rows in ((0, [5, 9]), (1, [33])):
        keys = pq.read_table(io.BytesIO(store.read_bytes(layout.dataset_shard(shard, "parquet")))).column("key").to_pylist()
        assert len(keys) == 400 - len(rows) and not {sample_key(shard, r) for r in rows} & set(keys)
        names = tar_names(store, layout.dataset_shard(shard))
        assert len(names) == 2 * (400 - len(rows)) and f"{sample_key(shard, rows[0])}.jpg" not in names
        meta = pq.read_table(io.BytesIO(store.read_bytes(layout.embedding_metadata(shard)))).to_pylist()
        assert len(meta) == 400 and all(meta[r]["url"] is None and meta[r]["caption"] is None for r in rows)
        assert meta[0]["url"] is not None
    # recorded, and blocklisted for later runs (here and in the run's own list)
    records = [n for n in store.list("takedowns") if n.endswith(".json")]
    assert len(records) == 2
    reasons = sorted(store.read_json(f"takedowns/{n}")["reason"] for n in records)
    assert reasons == ["DMCA 1234", "hash list"]
    for text in (store.read_bytes(layout.TAKEDOWN_BLOCKLIST).decode(), blocklist.read_text()):
        listed = Blocklist.parse(text.splitlines())
        assert listed.url_blocked(meta0[5]["url"]) and listed.url_blocked(meta0[9]["url"])
        assert sha in listed.sha256 and "http://127.0.0.1/never-seen.jpg" in listed.urls
    assert "http://example.invalid/old.jpg" in blocklist.read_text()

    # a second run of the same list changes nothing and says so
    again = takedown("--store", store_uri, "--hashes", str(hash_list))
    assert "removed 0 samples (1 already removed before)" in again.stdout


def test_a_list_of_the_wrong_kind_is_refused_with_a_message(tmp_path, world):
    store = make_run(str(tmp_path / "store"))
    add_shard(store, world, 0, 10)
    hashes = tmp_path / "h.txt"
    hashes.write_text("0" * 64 + "\n")
    out = takedown("--store", str(tmp_path / "store"), "--urls", str(hashes))
    assert out.returncode == 2 and "holds hashes; pass it with --hashes" in out.stderr
    junk = tmp_path / "j.txt"
    junk.write_text("not a url\n")
    out = takedown("--store", str(tmp_path / "store"), "--urls", str(junk))
    assert out.returncode == 2 and "j.txt:1: not a URL" in out.stderr
