"""`clipfleet run --wat ... --until extract` as a user runs it: its own embedded fleet, twice."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, defaultdict

import pyarrow.parquet as pq

from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store
from clipfleet.workers.extract.rules import extract_pairs
from clipfleet.workers.extract.wat import open_wat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def clipfleet_run(wats: list[str], store: str, state_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPFLEET_STATE_DIR": str(state_dir)}
    return subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "run", "--wat", *wats, "--store", store,
                           "--until", "extract", "--allow-private-addresses", "--shard-size", "200"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def occurrences(wats: list[str]) -> dict[str, set]:
    """Every (caption, page, WAT index) each URL has, before dedup across WATs."""
    seen = defaultdict(set)
    cfg = RunConfig.make(store="unused").extract
    for index, wat in enumerate(wats):
        with open_wat(wat) as source:
            for url, caption, page_url in extract_pairs(source, cfg, Counter()):
                seen[url].add((caption, page_url, index))
    return seen


def test_run_until_extract_then_resume(sandbox, tmp_path):
    store_uri = str(tmp_path / "store")
    first = clipfleet_run(sandbox.wats, store_uri, tmp_path / "state")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sent 3 of 3 extract tasks" in first.stdout
    assert "starting an embedded fleet" in first.stderr

    store = Store(store_uri)
    rows = [r for name in store.list("urls") for r in pq.read_table(store.path(f"urls/{name}")).to_pylist()]
    urls = Counter(r["url"] for r in rows)
    assert set(urls) == {t["url"] for t in sandbox.truth} and set(urls.values()) == {1}
    # Segments run side by side, so a URL in two WATs goes to whichever segment claimed it
    # first; every other URL must match the ground truth exactly.
    truth = {t["url"]: (t["caption"], t["page_url"]) for t in sandbox.truth}
    seen = occurrences(sandbox.wats)
    for r in rows:
        got = (r["caption"], r["page_url"])
        if got != truth[r["url"]]:
            assert len({index for *_, index in seen[r["url"]]}) > 1, r
            assert got in {(caption, page) for caption, page, _ in seen[r["url"]]}, r

    markers = {m["shard"]: m for m in store.markers("extract")}
    assert sorted(markers) == [0, 1, 2]
    assert sum(m["stats"]["pairs"] for m in markers.values()) == len(sandbox.truth)

    again = clipfleet_run(sandbox.wats, store_uri, tmp_path / "state")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do: all 3 extract tasks already done" in again.stdout
    assert "starting an embedded fleet" not in again.stderr
    assert {m["shard"]: m for m in store.markers("extract")} == markers


def test_a_wat_no_record_can_be_read_from_fails_naming_itself_and_a_fixed_file_runs(tmp_path):
    """Not a done shard with 0 pairs: the run fails, says which file and why; once the file is
    fixed, the same command does its work."""
    from tests.workers.extract.test_wat_reading import pages
    from tests.workers.extract.watfile import write_wat

    good, bad = tmp_path / "good.warc.wat.gz", tmp_path / "excerpt.warc.wat.gz"
    write_wat(good, pages(30))
    bad.write_bytes(b"<html><body>403 Forbidden: this is not the WAT you asked for</body></html>\n")
    store_uri = str(tmp_path / "store")
    first = clipfleet_run([str(good), str(bad)], store_uri, tmp_path / "state")
    said = first.stdout + first.stderr
    assert first.returncode != 0, said[-3000:]
    assert f"{bad}: no WARC record could be read" in said, said[-3000:]
    store = Store(store_uri)
    assert [m["shard"] for m in store.markers("extract")] == [0]  # the good file's segment only
    [letter] = store.deadletters("extract")
    assert letter["shard"] == 1 and str(bad) in str(letter) and "no WARC record could be read" in str(letter)

    write_wat(bad, [p for p in pages(50)][30:])  # the file fixed: pages the good one does not have
    again = clipfleet_run([str(good), str(bad)], store_uri, tmp_path / "state")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    markers = {m["shard"]: m for m in store.markers("extract")}
    assert sorted(markers) == [0, 1] and markers[1]["stats"]["pairs"] == 20
