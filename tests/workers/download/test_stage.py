"""The download stage on whole shards from the sandbox: statuses, img2dataset's layout, blocklist."""
from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from clipfleet.shared.layout import IMAGE_EXTRA_FIELDS
from clipfleet.shared.pipeline import execute
from clipfleet.shared.storage import Store
from tests.workers.download.conftest import make_run, make_stage, url_table, write_url_shard
from tests.workers.download.test_fetch import resolver_mapping

RESULT_COLUMNS = ["key", "status", "error_message", "width", "height", "original_width",
                  "original_height", "sha256"]


def run_shard(store_uri: str, redis_url: str, urls: list[str], captions=None, shard: int = 0,
              hooks: dict | None = None, **options):
    cfg = make_run(store_uri, **options)
    store = Store(store_uri)
    write_url_shard(store, shard, url_table(urls, captions))
    marker = execute(make_stage(cfg, redis_url, **(hooks or {})), store, shard)
    return store, marker


def outputs(store: Store, shard: int = 0):
    """(parquet rows, {tar member name: bytes}) of one published shard."""
    rows = pq.read_table(io.BytesIO(store.read_bytes(f"images/{shard:05d}.parquet"))).to_pylist()
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(f"images/{shard:05d}.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return rows, members


@pytest.mark.timeout(120)
def test_every_corner_case_ends_with_its_expected_status_and_error(tmp_path, redis_url, sandbox, corner):
    resolver = resolver_mapping({c["resolve_host"]: c["resolve_addr"] for c in corner if c["resolve_host"]})
    sandbox.reset_counts()
    store, marker = run_shard(str(tmp_path / "store"), redis_url, [c["url"] for c in corner],
                              [c["case"] for c in corner], hooks={"resolver": resolver})
    rows, members = outputs(store)
    by_case = {r["caption"]: r for r in rows}
    for case in corner:
        row = by_case[case["case"]]
        if case["expected_status"] == "success":
            assert row["status"] == "success", (case["case"], row["error_message"])
            assert f"{row['key']}.jpg" in members
        else:
            assert row["status"] in ("failed_to_download", "failed_to_resize"), case["case"]
            assert case["expected_error"] in row["error_message"], (case["case"], row["error_message"])
            assert f"{row['key']}.jpg" not in members
    stats = marker["stats"]
    assert stats["count"] == len(corner)
    assert stats["refused"] == {"private address": 1, "x-robots-tag": 1}


def test_shard_is_written_in_img2datasets_layout(store_uri, redis_url, sandbox, truth):
    urls, captions = truth.column("url").to_pylist()[:12], truth.column("caption").to_pylist()[:12]
    store, marker = run_shard(store_uri, redis_url, urls, captions, shard=3)
    assert store.list("images") == ["00003.parquet", "00003.tar", "00003_stats.json"]
    assert marker["outputs"] == ["images/00003.parquet", "images/00003.tar", "images/00003_stats.json"]
    rows, members = outputs(store, 3)

    assert list(rows[0]) == ["url", "caption", "page_url", "language", "language_score", "uid"] + RESULT_COLUMNS \
        + [name for name, _ in IMAGE_EXTRA_FIELDS]
    assert [r["key"] for r in rows] == [f"00003{i:04d}" for i in range(12)]
    expected = {r["url"]: r for r in truth.to_pylist()}
    for row in rows:
        assert row["status"] == "success" and row["error_message"] is None
        assert len(row["phash"]) == 16 and row["contaminated"] is None  # no --decontaminate set
        assert row["sha256"] == expected[row["url"]]["sha256"]
        assert (row["original_width"], row["original_height"]) == (expected[row["url"]]["width"],
                                                                   expected[row["url"]]["height"])
        assert (row["width"], row["height"]) == (256, 256)
    assert list(members) == [f"{r['key']}.{ext}" for r in rows for ext in ("jpg", "json", "txt")]
    first = rows[0]
    assert json.loads(members[f"{first['key']}.json"]) == first
    assert members[f"{first['key']}.txt"].decode() == first["caption"]

    stats = json.loads(store.read_bytes("images/00003_stats.json"))
    assert (stats["count"], stats["successes"], stats["failed_to_download"], stats["failed_to_resize"]) == (12, 12, 0, 0)
    assert stats["status_dict"] == {"success": 12}
    assert marker["stats"]["success"] == 12


def test_webdataset_reads_the_tar_as_it_is(tmp_path, redis_url, sandbox, truth):
    urls = truth.column("url").to_pylist()[:5]
    store, _ = run_shard(str(tmp_path / "store"), redis_url, urls)
    samples = list(wds.WebDataset(str(tmp_path / "store/images/00000.tar"), shardshuffle=False).decode("rgb"))
    assert [s["__key__"] for s in samples] == [f"00000{i:04d}" for i in range(5)]
    assert all(s["jpg"].shape == (256, 256, 3) and s["json"]["status"] == "success" for s in samples)


def test_blocklisted_items_are_never_stored(tmp_path, redis_url, sandbox, truth):
    images = truth.to_pylist()[:8]
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("\n".join([
        "# known-bad items",
        images[1]["url"],
        f"sha256:{images[2]['sha256']}",
        images[3]["md5"],
    ]) + "\n")
    store, marker = run_shard(str(tmp_path / "store"), redis_url, [i["url"] for i in images],
                              blocklist=str(blocklist))
    rows, members = outputs(store)
    blocked = {1: "blocklisted url", 2: "blocklisted sha256", 3: "blocklisted md5"}
    for i, row in enumerate(rows):
        if i in blocked:
            assert row["status"] == "failed_to_download" and row["error_message"] == blocked[i]
            assert row["sha256"] is None
            assert not any(name.startswith(row["key"]) for name in members)
        else:
            assert row["status"] == "success"
    assert len(members) == 5 * 3  # jpg, json, txt of the five others
    assert marker["stats"]["refused"] == {"blocklist md5": 1, "blocklist sha256": 1, "blocklist url": 1}


@pytest.mark.timeout(300)
def test_same_columns_keys_and_members_as_img2dataset(tmp_path, redis_url, sandbox, truth):
    """img2dataset and this stage on the same URL list: the same layout, file for file."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download
    urls = truth.column("url").to_pylist()[:6] + [sandbox.url + "/corner/missing.jpg"]
    table = url_table(urls)
    pq.write_table(table, tmp_path / "urls.parquet")
    download(url_list=str(tmp_path / "urls.parquet"), input_format="parquet", url_col="url",
             caption_col="caption", save_additional_columns=["page_url", "language", "language_score", "uid"],
             output_folder=str(tmp_path / "img2dataset"), output_format="webdataset", processes_count=1,
             thread_count=4, image_size=256, resize_mode="border", encode_format="jpg", encode_quality=95,
             extract_exif=False, timeout=4)
    theirs = pq.read_table(tmp_path / "img2dataset/00000.parquet")
    with tarfile.open(tmp_path / "img2dataset/00000.tar") as tar:
        their_members = sorted(tar.getnames())
        their_json = json.load(tar.extractfile(next(n for n in tar.getnames() if n.endswith(".json"))))

    store, _ = run_shard(str(tmp_path / "store"), redis_url, urls)
    ours = pq.read_table(io.BytesIO(store.read_bytes("images/00000.parquet")))
    rows, members = outputs(store)

    # The same columns, then ours (the perceptual hash and the decontamination mark); img2dataset's
    # reader shuffles the input columns, we keep their order.
    extra = [name for name, _ in IMAGE_EXTRA_FIELDS]
    assert ours.schema.names[-len(extra):] == extra
    ours = ours.drop_columns(extra)
    assert sorted(ours.schema.names) == sorted(theirs.schema.names)
    assert ours.schema.names[-len(RESULT_COLUMNS):] == theirs.schema.names[-len(RESULT_COLUMNS):] == RESULT_COLUMNS
    for name in RESULT_COLUMNS:
        assert ours.schema.field(name).type == theirs.schema.field(name).type, name
    assert sorted(members) == their_members
    assert sorted(json.loads(next(v for k, v in members.items() if k.endswith(".json")))) == sorted([*their_json, *extra])
    theirs_by_key = {r["key"]: r for r in theirs.to_pylist()}
    for row in rows:
        other = theirs_by_key[row["key"]]
        assert (row["url"], row["status"], row["sha256"]) == (other["url"], other["status"], other["sha256"])
        assert (row["width"], row["height"], row["original_width"], row["original_height"]) == \
            (other["width"], other["height"], other["original_width"], other["original_height"])
