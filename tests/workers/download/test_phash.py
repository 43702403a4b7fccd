"""Perceptual hashes on the sandbox world with planted copies: each copy (re-encoded at quality 40,
shrunk to half, cropped by 3%) of a picture at its own URL. A taken-down picture's copies are removed
from the run and refused by a later one; a decontamination set's pictures are found; distinct
pictures are not matched."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.workers.download.blocklist import Blocklist
from clipfleet.sandbox.server import SandboxServer
from clipfleet.shared import layout
from clipfleet.shared.images import COPY_KINDS, web_copies
from clipfleet.shared.storage import Store
from clipfleet.workers.download.options import PHASH_DISTANCE
from clipfleet.workers.download.phash import PhashList, distances, phash_bytes, to_int
from tests.workers.download.conftest import WORLD_SAMPLES
from tests.workers.download.test_stage import outputs, run_shard

KINDS = COPY_KINDS


def copies(data: bytes, **settings) -> dict[str, bytes]:
    """The same picture as the web copies it: re-encoded at quality 40, shrunk to half, cropped by 3%."""
    return web_copies(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), **settings)


def original(world: Path, url: str) -> bytes:
    return (world / "web" / url.split("/", 3)[3]).read_bytes()


@pytest.fixture(scope="module")
def planted(world, truth, tmp_path_factory):
    """A web of copies: {original url: {kind: copy url}} under copies/, and other copies of each
    (other bytes: quality 50, 40% size, 2.5% crop) under reposted/, served from loopback."""
    root = tmp_path_factory.mktemp("copies")
    with SandboxServer(root, port=0) as server:
        urls = {}
        for folder, settings in (("copies", {}), ("reposted", {"quality": 50, "scale": 0.4, "crop": 0.025})):
            (root / "web" / folder).mkdir(parents=True)
            for i, url in enumerate(truth.column("url").to_pylist()):
                for kind, data in copies(original(world, url), **settings).items():
                    (root / f"web/{folder}/{i}-{kind}.jpg").write_bytes(data)
                    urls.setdefault(folder, {}).setdefault(url, {})[kind] = f"{server.url}/{folder}/{i}-{kind}.jpg"
        yield urls


def test_copies_are_near_their_original_and_distinct_pictures_are_not(world, truth):
    urls = truth.column("url").to_pylist()
    hashes = [phash_bytes(original(world, url)) for url in urls]
    near = {kind: 0 for kind in KINDS}
    for url, phash in zip(urls, hashes):
        for kind, data in copies(original(world, url)).items():
            near[kind] += int(distances(np.array([to_int(phash)], np.uint64), phash_bytes(data))[0]) <= PHASH_DISTANCE
    print("copies within", PHASH_DISTANCE, "bits of their original, of", len(urls), ":", near)
    assert near["q40"] == near["half"] == len(urls)
    assert near["crop3"] >= 0.95 * len(urls)
    everything = np.array([to_int(h) for h in hashes], np.uint64)
    pairs = np.concatenate([distances(everything[i + 1:], h) for i, h in enumerate(hashes[:-1])])
    false_matches = float((pairs <= PHASH_DISTANCE).mean())
    print(f"false match rate between distinct pictures: {false_matches:.4f} of {len(pairs)} pairs")
    assert len(pairs) == WORLD_SAMPLES * (WORLD_SAMPLES - 1) // 2
    assert false_matches <= 0.02


def test_blocklist_lines_with_a_perceptual_hash_and_a_distance():
    listed = Blocklist.parse(["# partners' list", "phash:00000000000000FF/3", "phash:ffffffffffffffff",
                              "sha256:" + "a" * 64])
    assert listed.phash.entries == {"00000000000000ff": 3, "ffffffffffffffff": PHASH_DISTANCE}
    assert listed.sha256 == {"a" * 64}
    assert listed.phash.match("000000000000007f") == "00000000000000ff"      # 1 bit apart
    assert listed.phash.match("000000000000001f") == "00000000000000ff"      # 3 bits: the entry's own distance
    assert listed.phash.match("000000000000000f") is None                    # 4 bits: over it
    assert listed.phash.match(None) is None                                   # a sample without a picture
    for bad in ("phash:123", "phash:zzzzzzzzzzzzzzzz/2", "phash:00000000000000ff/x"):
        with pytest.raises(ValueError, match="phash:<16 hex>"):
            Blocklist.parse([bad])


def download(tmp_path: Path, name: str, redis_url: str, urls: list[str], **options):
    store, marker = run_shard(str(tmp_path / name), redis_url, urls, **options)
    rows, members = outputs(store)
    return store, marker, {row["url"]: row for row in rows}, members


def embedded(store: Store, rows: dict) -> None:
    """The embeddings' metadata of a downloaded shard, as the stages after download leave it:
    what takedown reads (the CLIP and embed stages themselves are not what is tested here)."""
    kept = [row for row in rows.values() if row["status"] == "success"]
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": [r["key"] for r in kept], "url": [r["url"] for r in kept],
                             "caption": [r["caption"] for r in kept]}), buf)
    store.write_bytes(layout.embedding_metadata(0), buf.getvalue())


def test_a_taken_down_pictures_copies_leave_the_run_and_a_later_run_refuses_them(
        tmp_path, redis_url, sandbox, world, truth, planted):
    urls = truth.column("url").to_pylist()
    gone, others = urls[:8], urls[20:30]
    copy_urls = [planted["copies"][url][kind] for url in gone for kind in KINDS]
    store, _, rows, _ = download(tmp_path, "first", redis_url, gone + copy_urls + others)
    assert all(row["status"] == "success" and len(row["phash"]) == 16 for row in rows.values())
    embedded(store, rows)

    # the list names two pictures by their files and two by their hashes
    listed = tmp_path / "takedown.txt"
    for i, url in enumerate(gone[:2]):
        (tmp_path / f"{i}.jpg").write_bytes(original(world, url))
    listed.write_text("0.jpg\n1.jpg\n" + "".join(f"phash:{phash_bytes(original(world, u))}\n" for u in gone[2:]))
    only_hashes = tmp_path / "phashes.txt"
    only_hashes.write_text("\n".join(listed.read_text().splitlines()[2:]))
    wrong = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "takedown", "--store", store.uri,
                            "--hashes", str(only_hashes)], capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "pass it with --urls or --phashes" in wrong.stderr
    done = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "takedown", "--store", store.uri,
                           "--phashes", str(listed), "--reason", "a court order"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    record = store.read_json(next(f"{layout.TAKEDOWNS}/{n}" for n in store.list(layout.TAKEDOWNS)
                                  if n.endswith(".json")))
    removed = {r["key"]: r for r in record["removed"]}
    key_of = {url: rows[url]["key"] for url in rows}
    with_copies = gone + copy_urls
    found = [u for u in with_copies if key_of[u] in removed]
    print(f"takedown found {len(found)} of {len(with_copies)} pictures and copies")
    assert len(found) >= 0.95 * len(with_copies) and set(gone) <= set(found)
    assert not any(key_of[u] in removed for u in others)
    assert {r["matched_by"] for r in removed.values()} == {"phash"}
    ids = np.load(io.BytesIO(store.read_bytes(layout.TAKEDOWN_IDS)))
    assert sorted(ids.tolist()) == sorted(r["id"] for r in removed.values())  # never served again
    _, members = outputs(store)
    assert not any(name.startswith(key_of[u]) for u in found for name in members)  # left the images tar
    lines = store.read_bytes(layout.TAKEDOWN_BLOCKLIST).decode().splitlines()
    assert sum(line.startswith("phash:") for line in lines) == len(gone)

    # a later run with the takedown's blocklist: other copies, at other URLs with other bytes, are
    # refused and counted under their reason
    reposted = [planted["reposted"][url][kind] for url in gone for kind in KINDS]
    _, marker, rows, _ = download(tmp_path, "later", redis_url, reposted + others,
                                  blocklist=store.path(layout.TAKEDOWN_BLOCKLIST))
    refused = [u for u in reposted if rows[u]["error_message"] == "blocklisted phash"]
    print(f"a later run refused {len(refused)} of {len(reposted)} reposted copies")
    # pHash holds for re-encoding and resizing; a crop moves a few pictures' hashes past the distance
    assert all(u in refused for u in reposted if "crop3" not in u)
    assert len(refused) >= 0.9 * len(reposted)
    assert all(rows[u]["status"] == "success" for u in others)
    assert all(rows[u]["phash"] is None for u in refused)  # refused: no picture, no hash
    assert marker["stats"]["refused"]["blocklist phash"] == len(refused)


@pytest.mark.parametrize("form", ["dir", "parquet"])
def test_a_decontamination_sets_pictures_are_found(tmp_path, redis_url, sandbox, world, truth, planted, form):
    urls = truth.column("url").to_pylist()
    evaluation, others = urls[:5], urls[25:35]
    folder = tmp_path / "evalset"
    folder.mkdir()
    for i, url in enumerate(evaluation):
        (folder / f"{i}.png").write_bytes(original(world, url))  # the set's own files, not our URLs
    (folder / "LICENSE.txt").write_text("not a picture: skipped")
    source = str(folder)
    if form == "parquet":
        source = str(tmp_path / "evalset.parquet")
        pq.write_table(pa.table({"phash": sorted(PhashList.load(str(folder)).entries)}), source)
    copy_urls = [planted["copies"][url][kind] for url in evaluation for kind in KINDS]
    wanted = evaluation + copy_urls

    _, marker, rows, _ = download(tmp_path, "mark", redis_url, wanted + others, decontaminate=source)
    marked = [u for u in wanted if rows[u]["contaminated"]]
    assert len(marked) >= 0.95 * len(wanted) and set(evaluation) <= set(marked)
    assert all(rows[u]["status"] == "success" for u in wanted + others)  # marked, not dropped
    assert not any(rows[u]["contaminated"] for u in others)
    assert marker["stats"]["contaminated"] == len(marked)

    _, marker, rows, _ = download(tmp_path, "drop", redis_url, wanted + others, decontaminate=source,
                                  decontaminate_mode="drop")
    dropped = [u for u in wanted if rows[u]["status"] != "success"]
    assert len(dropped) == len(marked)
    assert marker["stats"]["refused"]["decontaminated"] == len(dropped)
    assert all(rows[u]["status"] == "success" and rows[u]["contaminated"] is False for u in others)


def test_the_hash_is_imagehash_phash_of_the_thumbnail(world, truth):
    """phash_bgr runs imagehash.phash's steps itself (without its PIL round trip): the same bits."""
    import imagehash
    from PIL import Image

    from clipfleet.workers.download.phash import HASH_SIDE, phash_bgr
    for url in truth.column("url").to_pylist():
        img = cv2.imdecode(np.frombuffer(original(world, url), np.uint8), cv2.IMREAD_COLOR)
        thumb = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA)
        assert phash_bgr(img) == str(imagehash.phash(Image.fromarray(thumb)))
