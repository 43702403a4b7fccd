"""`clipfleet report` on a run built through the pipeline's stages: its numbers are the markers'
and the tables', it renders in a real headless Chromium without errors, and it works on a running
run, on damaged files and on an S3 store."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from clipfleet.shared.runstate import totals
from clipfleet.producer.report import build_report
from clipfleet.shared import layout
from clipfleet.shared.storage import Store, marker_path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


class Parsed(HTMLParser):
    """Tables (under the heading before them), images, and the text of the page."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: list[tuple[str, list[list[str]]]] = []
        self.images: list[dict] = []
        self.cells: list[dict] = []  # sample grid cells: {"section", "img", "caption"}
        self.text: list[str] = []
        self._heading, self._in, self._row, self._cell = "", None, None, None
        self._section, self._cap, self._key = "", False, None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h2", "h3"):
            self._in, self._heading = tag, ""
        elif tag == "table":
            self.tables.append((self._heading, []))
        elif tag == "tr":
            self._row = []
            self.tables[-1][1].append(self._row)
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "div" and attrs.get("class") == "cell":
            self.cells.append({"section": self._section, "img": None, "caption": "",
                               "key": (int(attrs["data-shard"]), attrs["data-key"])})
        elif tag == "img":
            self.images.append(attrs)
            if attrs.get("class") == "thumb":
                self.cells[-1]["img"] = attrs
        elif tag == "p" and attrs.get("class") == "cap":
            self._cap = True

    def handle_endtag(self, tag):
        if tag in ("h2", "h3"):
            self._in = None
            if tag == "h3":
                self._section = self._heading
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "p":
            self._cap = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in:
            self._heading += data
        if self._cell is not None:
            self._cell += data
        if self._cap and self.cells:
            self.cells[-1]["caption"] += data

    def table(self, first_header: str) -> list[list[str]]:
        return next(rows for _, rows in self.tables if rows and rows[0][0] == first_header)

    def table_under(self, heading_start: str) -> list[list[str]]:
        return next(rows for heading, rows in self.tables if heading.startswith(heading_start))


def number(text: str) -> int:
    return int(text.replace(",", ""))


def clip_rows(store: Store, shards) -> list[dict]:
    """Every judged sample with its language, read straight from the tables."""
    rows = []
    for shard in shards:
        images = {r["key"]: r for r in pq.read_table(store.path(layout.image_shard(shard, "parquet"))).to_pylist()}
        for r in pq.read_table(store.path(layout.clip_shard(shard))).to_pylist():
            rows.append({**r, "language": images[r["key"]]["language"], "caption": images[r["key"]]["caption"],
                         "shard": shard})
    return rows


def bucket(language) -> str:
    return "en" if language == "en" else ("none" if not language else "other")


def test_report_numbers_are_the_runs(built_run):
    directory, info = built_run
    store = Store(str(directory))
    page = Parsed(build_report(store))
    stages = {row[0]: row for row in page.table("stage")[1:]}
    extract, download = totals(m["stats"] for m in store.markers("extract")), totals(m["stats"] for m in store.markers("download"))
    assert number(stages["extract"][3]) == extract["img_links"] and number(stages["extract"][4]) == extract["pairs"]
    assert number(stages["download"][3]) == download["count"] == extract["pairs"]
    assert number(stages["download"][4]) == download["success"]
    judged = clip_rows(store, info["shards"])
    kept = [r for r in judged if r["kept"]]
    assert number(stages["clip"][3]) == len(judged) and number(stages["clip"][4]) == len(kept)
    assert totals(m["stats"] for m in store.markers("clip"))["kept"] == len(kept)
    published = sum(pq.read_table(store.path(layout.dataset_shard(s, "parquet"))).num_rows for s in info["shards"])
    assert number(stages["tag"][4]) == published == len(kept)
    assert number(stages["index"][3]) == len(kept)  # every published vector indexed
    index = {row[0]: row for row in page.table("modality")[1:]}
    assert set(index) == {"image", "text"} and index["image"][3] == str(len(info["shards"]))

    glance = {row[0]: row[1] for row in page.table("at a glance")[1:]}
    assert glance["kept by the CLIP filter"].startswith(f"{100 * len(kept) / len(judged):.1f}% of {len(judged):,} judged")

    # Every drop reason of extract is listed with its count; download's failures are named.
    drops = dict(page.table_under("extract:"))
    for reason, n in extract.items():
        if reason.startswith("drop_"):
            assert number(drops[reason]) == n
    download_drops = dict(page.table_under("download:"))
    assert number(download_drops["failed_to_download"]) == download["failed_to_download"]

    # Language split: candidates from the extract markers, kept from the tables.
    languages = {row[0]: row[1:] for row in page.table("bucket")[1:]}
    header = page.table("bucket")[0][1:]
    kept_split = Counter(bucket(r["language"]) for r in kept)
    for name, key in (("English", "en"), ("other language", "other"), ("no language", "none")):
        assert number(languages[name][header.index("candidates (extract)")]) == extract[f"lang_{key}"]
        assert number(languages[name][header.index("kept by CLIP")]) == kept_split[key]

    # Shares above LAION's thresholds are the tag tables'.
    tags = [r for s in info["shards"] for r in pq.read_table(store.path(layout.tag_shard(s))).to_pylist()]
    shares = {row[0]: row[1] for row in page.table("share of kept samples")[1:]}
    unsafe = 100 * sum(r["punsafe"] > 0.5 for r in tags) / len(tags)
    assert shares["punsafe > 0.5"] == f"{unsafe:.2f}%"

    # The sample grid: kept captions are kept samples', dropped ones are below the threshold.
    by_key = {(r["shard"], r["key"]): r for r in judged}
    kept_cells = [c for c in page.cells if c["section"] == "kept"]
    dropped_cells = [c for c in page.cells if c["section"] == "dropped by the CLIP filter"]
    assert len(kept_cells) == min(12, len(kept)) and len(dropped_cells) == 12
    assert all(by_key[c["key"]]["kept"] and c["caption"] == by_key[c["key"]]["caption"][:140] for c in kept_cells)
    assert not any(by_key[c["key"]]["kept"] for c in dropped_cells)
    assert all(c["img"] is not None for c in kept_cells + dropped_cells)

    plots = [i for i in page.images if i.get("class") == "plot"]
    assert [p["alt"] for p in plots] == ["funnel", "language split", "similarity", "tag scores",
                                         "image sizes", "throughput"]
    for image in page.images:  # every picture is an inline image that decodes
        header, _, data = image["src"].partition(",")
        assert header.startswith("data:image/") and Image.open(io.BytesIO(base64.b64decode(data))).size[0] > 0


def test_report_renders_in_headless_chromium(built_run, tmp_path):
    from playwright.sync_api import sync_playwright
    out = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "report", "--store", str(built_run[0]),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: problems.append(f"request {r.url}") if not r.url.startswith(("file:", "data:")) else None)
            page.goto(out.as_uri())
            page.wait_for_load_state("load")
            sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.className, e.complete, e.naturalWidth])")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert sum(1 for cls, _, _ in sizes if cls == "plot") == 6
    assert all(complete and width > 0 for _, complete, width in sizes), sizes
    shot = Image.open(tmp_path / "report.png")
    assert shot.size[0] == 1200 and shot.size[1] > 3000  # the whole page, every section


def test_report_on_a_running_run(run_copy):
    store = Store(str(run_copy))
    for stage in ("embed", "tag", "index", "index-part", "index-train", "index-merge"):
        shutil.rmtree(run_copy / "_markers" / stage, ignore_errors=True)
    shutil.rmtree(run_copy / "index")
    # clip's last shard has its table but no marker yet: it is not counted, not read.
    (run_copy / marker_path("clip", 3)).unlink()
    store.write_deadletter("embed", 2, {"error": "ModelNotAvailable: no weights for ViT-L-14"})
    page = Parsed(build_report(store))
    stages = {row[0]: row for row in page.table("stage")[1:]}
    assert stages["clip"][1] == "3" and stages["tag"][1] == "0"
    assert stages["embed"][2] == "1" and "dead embed shard 2: ModelNotAvailable: no weights" in "".join(page.text)
    assert "running or stopped early" in "".join(page.text)
    judged = clip_rows(store, [0, 1, 2])
    assert number(stages["clip"][3]) == len(judged)
    text = "".join(page.text)
    assert "no shard has been tagged yet" in text and "no serving index yet" in text
    assert "from the clip tables of 3 shards" in text
    assert [i["alt"] for i in page.images if i.get("class") == "plot"] == [
        "funnel", "language split", "similarity", "image sizes", "throughput"]


def test_report_on_a_store_with_only_a_run_file(tmp_path):
    from clipfleet.shared.runconfig import RunConfig
    store = Store(str(tmp_path / "fresh"))
    RunConfig.make(store=store.uri).save(store)
    page = Parsed(build_report(store))
    text = "".join(page.text)
    assert "no stage has finished a shard yet" in text and "no samples downloaded yet" in text
    assert not [i for i in page.images if i.get("class") == "plot"]


def test_damaged_files_are_named_not_fatal(run_copy):
    store = Store(str(run_copy))
    clip_table = run_copy / layout.clip_shard(1)
    clip_table.write_bytes(clip_table.read_bytes()[:100])
    tar = run_copy / layout.image_shard(0)
    tar.write_bytes(tar.read_bytes()[:3000])
    page = Parsed(build_report(store))
    problems = [t for t in page.text if "unreadable" in t]
    assert len(problems) == 1 and layout.clip_shard(1) in problems[0]
    stages = {row[0]: row for row in page.table("stage")[1:]}
    assert stages["clip"][1] == "4"  # the markers still count every shard
    assert [i["alt"] for i in page.images if i.get("class") == "plot"][:3] == ["funnel", "language split",
                                                                               "similarity"]


def test_report_without_a_run_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "report", "--store",
                           str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "holds no run" in proc.stderr and not (tmp_path / "r.html").exists()


def test_report_on_s3_is_the_same_report(built_run, s3_server):
    import s3fs

    from tests.conftest import make_bucket
    bucket = make_bucket(s3_server)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    local = Path(built_run[0])
    for path in local.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/run/{path.relative_to(local)}")
    on_s3 = Parsed(build_report(Store(f"s3://{bucket}/run")))
    here = Parsed(build_report(Store(str(local))))
    assert on_s3.tables == here.tables
    assert [c["caption"] for c in on_s3.cells] == [c["caption"] for c in here.cells]
    assert len(on_s3.images) == len(here.images)
    assert re.search(r"s3://test-[0-9a-f]+/run", "".join(on_s3.text))


def test_report_counts_decontamination_marks_and_perceptual_refusals(run_copy):
    import json
    path = run_copy / marker_path("download", 0)
    marker = json.loads(path.read_text())
    marker["stats"]["contaminated"] = 3                       # as --decontaminate's default, mark, counts
    marker["stats"].setdefault("refused", {})["blocklist phash"] = 2
    marker["dropped"] = sorted({*marker.get("dropped", []), "refused"})
    path.write_text(json.dumps(marker))
    shutil.rmtree(run_copy / "_state")                        # the run state is read again from the markers
    text = " ".join(Parsed(build_report(Store(str(run_copy)))).text)
    assert "3 samples match the decontamination set" in text
    assert "blocklist phash" in text
