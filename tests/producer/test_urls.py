"""`--urls` input: the user's parquet files become URL shards with the extract stage's columns."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipfleet.producer.urls import URL_SHARD_SCHEMA, UrlInputError, write_url_shards
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store


def user_parquet(path, rows: int, url_col="URL", caption_col="TEXT", **extra) -> str:
    table = pa.table({url_col: [f"http://img.example/{i}.jpg" for i in range(rows)],
                      caption_col: [f"a red circle {i}" for i in range(rows)],
                      "similarity": [0.3] * rows, **extra})
    pq.write_table(table, path, row_group_size=3)  # row groups that do not line up with shards
    return str(path)


def shard(store: Store, shard_id: int) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read_bytes(f"urls/{shard_id:05d}.parquet")))


def test_shards_take_ids_from_input_and_part_with_standard_columns(store_uri, tmp_path):
    inputs = [user_parquet(tmp_path / "a.parquet", 10, language=["en"] * 10,
                           language_score=pa.array([0.9] * 10, pa.float32())),
              user_parquet(tmp_path / "b.parquet", 3, language=["fr"] * 3,
                           language_score=pa.array([0.8] * 3, pa.float32()))]
    cfg = RunConfig.make(store=store_uri, inputs=inputs, input_kind="urls", shard_size=4,
                    url_col="URL", caption_col="TEXT")
    store = Store(store_uri)
    assert write_url_shards(store, cfg) == [0, 1, 2, 1000]
    assert store.list("urls") == ["00000.parquet", "00001.parquet", "00002.parquet", "01000.parquet"]
    first = shard(store, 0)
    assert first.schema == URL_SHARD_SCHEMA
    assert first.column("url").to_pylist() == [f"http://img.example/{i}.jpg" for i in range(4)]
    assert first.column("caption").to_pylist()[0] == "a red circle 0"
    assert first.column("language").to_pylist() == ["en"] * 4
    assert len(set(first.column("uid").to_pylist())) == 4
    assert shard(store, 2).num_rows == 2 and shard(store, 1000).column("language").to_pylist() == ["fr"] * 3


def test_writing_again_is_idempotent(tmp_path):
    inputs = [user_parquet(tmp_path / "a.parquet", 5, url_col="url", caption_col="caption",
                           language=["en"] * 5, language_score=pa.array([0.9] * 5, pa.float32()))]
    store = Store(str(tmp_path / "store"))
    cfg = RunConfig.make(store=store.uri, inputs=inputs, input_kind="urls", shard_size=2)
    first = write_url_shards(store, cfg)
    before = {n: store.read_bytes(f"urls/{n}") for n in store.list("urls")}
    assert write_url_shards(store, cfg) == first == [0, 1, 2]
    assert {n: store.read_bytes(f"urls/{n}") for n in store.list("urls")} == before


def test_captions_without_a_language_column_are_tagged_like_the_extract_stage(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"url": ["http://img.example/1.jpg", "http://img.example/2.jpg"],
                             "caption": ["a photo of a red circle on a white background",
                                         "une photo d'un cercle rouge sur un fond blanc"]}), path)
    store = Store(str(tmp_path / "store"))
    write_url_shards(store, RunConfig.make(store=store.uri, inputs=[str(path)], input_kind="urls"))
    assert shard(store, 0).column("language").to_pylist() == ["en", "fr"]


def test_a_missing_column_is_named_with_the_option_to_fix_it(tmp_path):
    path = user_parquet(tmp_path / "laion.parquet", 3)  # URL / TEXT, LAION's names
    cfg = RunConfig.make(store=str(tmp_path / "store"), inputs=[path], input_kind="urls")
    with pytest.raises(UrlInputError, match="no column 'url' .*URL, TEXT.*--url-col"):
        write_url_shards(Store(cfg.store), cfg)
    cfg.input.url_col = "URL"
    with pytest.raises(UrlInputError, match="no column 'caption'.*--caption-col"):
        write_url_shards(Store(cfg.store), cfg)


def test_cli_names_the_missing_column_before_registering_the_run(tmp_path):
    path = user_parquet(tmp_path / "laion.parquet", 3)
    proc = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "run", "--urls", path, "--store",
                           str(tmp_path / "store"), "--until", "download"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CLIPFLEET_STATE_DIR": str(tmp_path / "state")})
    assert proc.returncode == 2
    assert "no column 'url'" in proc.stderr and "--url-col" in proc.stderr
    assert not (tmp_path / "store" / "run.json").exists()  # the corrected command is not "a different run"


def test_img2dataset_resize_flags_reach_the_stage(tmp_path):
    from clipfleet.producer.cli import build_parser, run_config_from_args
    urls = tmp_path / "u.parquet"
    pq.write_table(pa.table({"url": ["http://a.test/1.jpg"], "caption": ["one"]}), urls)
    args = build_parser().parse_args(["run", "--urls", str(urls), "--store", str(tmp_path / "s"),
                                      "--resize-mode", "keep_ratio", "--resize-only-if-bigger", "--skip-reencode"])
    opts = run_config_from_args(args, str(tmp_path / "s")).download
    assert (opts.resize_mode, opts.resize_only_if_bigger, opts.skip_reencode) == ("keep_ratio", True, True)
    defaults = run_config_from_args(build_parser().parse_args(
        ["run", "--urls", str(urls), "--store", str(tmp_path / "s")]), str(tmp_path / "s")).download
    assert (defaults.resize_only_if_bigger, defaults.skip_reencode) == (False, False)
