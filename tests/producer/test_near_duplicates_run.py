"""Near-duplicates in a real run, as a user runs it: `clipfleet run` (its embedded fleet) over a URL list
holding the sandbox's pictures and, at their own URLs and captions, copies of each (re-encoded at
quality 40, shrunk to half, cropped by 3%), shuffled across shards. Every stage is the real one, with
the shipped `shapes` model; the thresholds are the run's own calibration (no --near-dup-* flag), and
run.json records them. Before calibration the fixed eps 0.05 marked a quarter of this world's distinct
pictures as copies of each other (shapes puts pictures of one shape close together)."""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import tarfile
from collections import Counter

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.producer.fleet import free_port
from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared import layout
from clipfleet.shared.images import web_copies
from clipfleet.shared.storage import Store
from clipfleet.workers.index.plan import DEDUP_GROUPS
from tests.producer.test_card import CLI, REPO


def plant(world, port: int) -> tuple[list[dict], dict[str, str]]:
    """URL rows (originals and their copies, shuffled) and {copy url: its original's url}."""
    truth = pq.read_table(world / "ground_truth" / "images.parquet").to_pylist()
    (world / "web" / "copies").mkdir()
    rows, original = [], {}
    for t in truth:
        rows.append({"url": t["url"], "caption": t["caption"]})
        data = (world / "web" / t["url"].split("/", 3)[3]).read_bytes()
        for kind, copy in web_copies(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)).items():
            (world / "web" / "copies" / f"{t['id']}-{kind}.jpg").write_bytes(copy)
            url = f"http://127.0.0.1:{port}/copies/{t['id']}-{kind}.jpg"
            rows.append({"url": url, "caption": f"{t['caption']} ({kind} copy)"})
            original[url] = t["url"]
    random.Random(1).shuffle(rows)
    return rows, original


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """The run, made once for this module's tests: (its store folder, {copy url: original url})."""
    tmp_path = tmp_path_factory.mktemp("planted")
    port = free_port()
    world = tmp_path / "world"
    make_sandbox(world, samples=80, port=port, seed=7, wat_files=1)
    rows, original = plant(world, port)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    store_dir = tmp_path / "store"
    with SandboxServer(world):
        proc = subprocess.run(
            CLI + ["run", "--urls", str(tmp_path / "urls.parquet"), "--store", str(store_dir), "--until", "index",
                   "--shard-size", "40", "--allow-private-addresses", "--filter-model", "shapes",
                   "--multilingual-filter-model", "shapes", "--embed-model", "shapes", "--index-eval-queries", "0"],
            cwd=REPO, capture_output=True, text=True, timeout=500,
            env={**os.environ, "CLIPFLEET_STATE_DIR": str(tmp_path / "state")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return store_dir, original


@pytest.mark.timeout(600)
def test_a_run_groups_planted_copies_with_thresholds_calibrated_for_its_model(planted_run):
    store_dir, original = planted_run
    store = Store(str(store_dir))

    calibrated = store.read_json(layout.RUN_FILE)["near_duplicates"]
    print(json.dumps(calibrated))
    assert calibrated["copies_measured"] == 2 * 3 * len(store.done("embed"))  # 2 pictures a shard, 3 copies each
    assert calibrated["hamming_from"].startswith("95% of copies") and 4 <= calibrated["hamming"] <= 8
    assert calibrated["eps"] == calibrated["copy_distance_q95"] < calibrated["distinct_distance_q01"] / 3

    key_url, marks, in_tars = {}, {}, {}
    for path in sorted((store_dir / "dataset").glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "URL", "duplicate_of"])
        key_url.update(zip(table.column("key").to_pylist(), table.column("URL").to_pylist()))
        marks.update(zip(table.column("key").to_pylist(), table.column("duplicate_of").to_pylist()))
        with tarfile.open(path.with_suffix(".tar")) as tar:  # webdataset readers see the same marks
            in_tars.update((m.name.split(".")[0], json.load(tar.extractfile(m)).get("duplicate_of"))
                           for m in tar if m.name.endswith(".json"))
    assert in_tars == marks and sum(m is not None for m in marks.values()) >= 150
    url_key = {u: k for k, u in key_url.items()}
    groups = pq.read_table(io.BytesIO(store.read_bytes(DEDUP_GROUPS))).to_pylist()
    group_of = {g["key"]: g["group"] for g in groups}
    copies = [u for u in url_key if u in original and original[u] in url_key]  # both kept by the filter
    originals = [u for u in url_key if u not in original]
    found = sum(group_of.get(url_key[c], -1) == group_of.get(url_key[original[c]], -2) for c in copies)
    shared = Counter(group_of[url_key[u]] for u in originals if url_key[u] in group_of)
    merged = sum(n - 1 for n in shared.values())
    print(f"copies in their original's group: {found} of {len(copies)}; distinct pictures merged: "
          f"{merged} of {len(originals)}")
    assert len(copies) >= 100 and len(originals) >= 40
    assert found >= 0.95 * len(copies)
    assert merged <= 0.02 * len(originals)

    from clipfleet.producer.report import build_report
    page = build_report(store)  # a few groups as thumbnails, the kept sample first
    assert page.count("<h3>near-duplicate group of 4</h3>") == 4 and "thresholds calibrated on" in page
    first = page.index("<h3>near-duplicate group of 4</h3>")
    assert "· kept</p>" in page[first:first + 20000] and 'class="thumb" src="data:image/jpeg' in page[first:first + 20000]


def published_keys(store_dir) -> set[str]:
    return {k for path in (store_dir / "dataset").glob("*.parquet") for k in pq.read_table(path, columns=["key"]).column("key").to_pylist()}


@pytest.mark.timeout(600)
def test_dropped_duplicates_come_back_when_their_group_splits(planted_run, tmp_path):
    """--drop-near-duplicates leaves copies out of dataset/; if a later generation groups them no more
    (here: thresholds set to 0 bits and eps 0), they are published again, images and all."""
    from clipfleet.shared.pipeline import Stats
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.workers.index.dedup import DedupIndex
    store_dir = planted_run[0]
    store = Store(str(store_dir))
    everything = published_keys(store_dir)
    groups = pq.read_table(io.BytesIO(store.read_bytes(DEDUP_GROUPS))).to_pylist()
    duplicates = {g["key"] for g in groups if g["duplicate_of"] is not None}
    cfg = RunConfig.load(store)
    cfg.index.drop_near_duplicates = True
    (tmp_path / "a").mkdir()
    DedupIndex(cfg).run(store, "g00001", tmp_path / "a", Stats())
    assert published_keys(store_dir) == everything - duplicates
    cfg.index.near_dup_hamming, cfg.index.near_dup_eps = 0, 0.0  # the groups split: no copy is one now
    (tmp_path / "b").mkdir()
    task = DedupIndex(cfg)
    out = task.run(store, "g00001", tmp_path / "b", Stats())
    for rel, path in out.files.items():  # committed as the framework commits them
        store.write_bytes(rel, path.read_bytes())
    left = pq.read_table(io.BytesIO(store.read_bytes(DEDUP_GROUPS)))
    dropped_now = {k for k, d in zip(left.column("key").to_pylist(), left.column("duplicate_of").to_pylist()) if d}
    assert len(duplicates - dropped_now) >= 40  # only pictures with equal hashes stay grouped; the rest come back
    assert published_keys(store_dir) == everything - dropped_now
    members = set()
    for path in (store_dir / "dataset").glob("*.tar"):
        with tarfile.open(path) as tar:
            members |= {m.name.split(".")[0] for m in tar if m.name.endswith((".jpg", ".png", ".webp"))}
    assert members == everything - dropped_now
