"""`clipfleet report`: a run as one self-contained HTML page, the way LAION's blog showed its own.

It reads only what the stages published: the run state (counts and durations of every marked
shard, from the per-stage summaries: each marker is read once, ever), a spread of whole markers,
and the tables of a spread of marked shards (`--max-shards` of each kind, evenly spaced, so a
run of 500 000 shards reports in minutes; the page says how many were read). A shard without a
marker is not read, so a running run reports what is finished so far. Plots are PNGs inline
(producer/report_plots.py); the page has no script and loads nothing.
"""
from __future__ import annotations

import base64
import io
import random
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.layout import RUN_FILE
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.runstate import RunState, StageState
from clipfleet.shared.stages import REGISTRY
from clipfleet.shared.storage import Store

INDEX_INFOS = {"image": f"{layout.INDEX}/infos.json", "text": f"{layout.INDEX}/text/infos.json"}
# What LAION-5B reported (blog and paper), shown beside the run's numbers.
LAION_LANGUAGES = {"en": 2.32e9, "other": 2.26e9, "none": 1.27e9}
LAION_FACTS = [
    ("kept by the CLIP filter", "about 10% of 50+ billion candidates (5.85 billion)"),
    ("English / other / no language, of the kept", "2.32 B / 2.26 B / 1.27 B (40% / 39% / 22%)"),
    ("punsafe > 0.5", "2.9% to 3.3% per bucket"),
    ("pwatermark > 0.8", "4% to 6% per bucket"),
]


class ReportError(ValueError):
    """The store cannot be reported on (no run there)."""


MARKERS_READ = 64  # whole markers read per stage, evenly spread, for what only they say (device, dim)


@dataclass
class StageView:
    """A stage as the report sees it: its state (counts from the per-stage summaries), a row per
    done shard (samples, times), and a spread of whole markers."""
    name: str
    run: RunState
    state: StageState
    dead: list[dict]

    @property
    def rows(self) -> dict:
        return self.state.rows

    @property
    def markers(self) -> list[dict]:
        names = spread(sorted(self.rows), MARKERS_READ)
        return [m for m in (self.run.marker(self.name, n) for n in names) if m]

    @property
    def totals(self) -> dict:
        return self.state.totals

    @property
    def samples_in(self) -> int | None:
        return self.state.samples_in if self.rows else None

    @property
    def samples_out(self) -> int | None:
        return self.state.samples_out if self.rows else None

    @property
    def drops(self) -> list[tuple[str, int]]:
        return self.state.drop_reasons(top=12)

    def work_s(self) -> float:
        return self.state.work_s

    def span_s(self) -> float:
        return self.state.wall_s


def read_stages(store: Store) -> dict[str, StageView]:
    """Every registered stage's view (empty for those the run does not pass through)."""
    run = RunState(store)
    states = {s.stage: s for s in run.all()}
    views = {}
    for name in REGISTRY.names():
        views[name] = StageView(name, run, states.get(name) or StageState(name, 0, 0, 0, True),
                                store.deadletters(name))
    return views


def spread(shards: list[int], n: int) -> list[int]:
    """n shards evenly spaced over the run (all of them when there are fewer)."""
    if len(shards) <= n:
        return list(shards)
    step = len(shards) / n
    return [shards[int(i * step)] for i in range(n)]


def _shard_ids(view: StageView) -> list[int]:
    return sorted(int(n) for n in view.rows if n.isdigit())


def _table(store: Store, rel: str, columns: list[str] | None = None, problems: list | None = None) -> pa.Table | None:
    try:
        table = pq.read_table(io.BytesIO(store.read_bytes(rel)))
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged file is reported and skipped, not the end of the report
        if problems is not None:
            problems.append(f"{rel} unreadable: {exc.__class__.__name__}: {exc}")
        return None
    if columns:
        table = table.select([c for c in columns if c in table.column_names])
    return table


IMAGE_COLUMNS = ["key", "status", "url", "caption", "language", "width", "height", "original_width",
                 "original_height", "error_message"]


@dataclass
class Samples:
    """What the tables of the spread of shards hold, joined by key within each shard."""
    shards: dict[str, list[int]] = field(default_factory=dict)  # kind -> shards read
    images: list[dict] = field(default_factory=list)            # images/ rows + similarity, kept
    tags: dict[str, list[float]] = field(default_factory=dict)
    tar_bytes: int = 0
    tar_images: int = 0
    problems: list[str] = field(default_factory=list)


def read_samples(store: Store, views: dict[str, StageView], max_shards: int, progress=None) -> Samples:
    out = Samples()
    downloaded = spread(_shard_ids(views["download"]), max_shards)
    judged = set(_shard_ids(views["clip"]))
    tagged = spread(_shard_ids(views["tag"]), max_shards)
    out.shards = {"download": downloaded, "clip": [s for s in downloaded if s in judged], "tag": tagged}

    def one_shard(shard):
        rows = _table(store, layout.image_shard(shard, "parquet"), IMAGE_COLUMNS, out.problems)
        rows = rows.to_pylist() if rows is not None else []
        if shard in judged:
            clip = _table(store, layout.clip_shard(shard), ["key", "similarity", "kept"], out.problems)
            by_key = {r["key"]: r for r in clip.to_pylist()} if clip is not None else {}
            for row in rows:
                row.update({"similarity": None, "kept": None, **by_key.get(row["key"], {}), "shard": shard})
        size = _size(store, layout.image_shard(shard))
        return shard, rows, size

    with ThreadPoolExecutor(8) as pool:
        for shard, rows, size in _progress(pool.map(one_shard, downloaded), len(downloaded), "images", progress):
            for row in rows:
                row.setdefault("shard", shard)
            out.images += rows
            if size:
                out.tar_bytes += size
                out.tar_images += sum(1 for r in rows if r.get("status") == "success")
    tag_columns: dict[str, list[float]] = {}
    for shard in _progress(tagged, len(tagged), "tags", progress):
        table = _table(store, layout.tag_shard(shard), problems=out.problems)
        if table is None:
            continue
        for name in table.column_names:
            if name != "key" and pa.types.is_floating(table.schema.field(name).type):
                tag_columns.setdefault(name, []).extend(v for v in table.column(name).to_pylist() if v is not None)
    out.tags = tag_columns
    return out


def _size(store: Store, rel: str) -> int:
    try:
        return int(store.fs.size(store.path(rel)))
    except FileNotFoundError:
        return 0


def _progress(items, total: int, what: str, enabled):
    if not enabled or total < 2:
        return items
    from tqdm import tqdm
    return tqdm(items, total=total, desc=f"reading {what}", unit="shard")


# -- thumbnails ----------------------------------------------------------------------------------
def thumbnails(store: Store, rows: list[dict], size: int = 112) -> dict[str, str]:
    """key -> JPEG data URI for `rows` (each with key and shard), read from images/{shard}.tar."""
    wanted: dict[int, set[str]] = {}
    for row in rows:
        wanted.setdefault(row["shard"], set()).add(row["key"])
    found = {}
    for shard, keys in wanted.items():
        try:
            raw = store.open(layout.image_shard(shard))
        except FileNotFoundError:
            continue
        try:
            with raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                for member in tar:
                    key, _, ext = member.name.rpartition("/")[2].partition(".")
                    if key in keys and ext in ("jpg", "jpeg", "png", "webp") and member.isfile():
                        thumb = _thumbnail(tar.extractfile(member).read(), size)
                        if thumb:
                            found[key] = thumb
        except (tarfile.TarError, OSError):  # a damaged tar: what was read so far is shown
            continue
    return found


def _thumbnail(data: bytes, size: int) -> str | None:
    from PIL import Image
    try:
        picture = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception:  # an undecodable image gets no thumbnail, its caption still shows
        return None
    picture.thumbnail((size, size))
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def pick_grid(images: list[dict], per_kind: int, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    kept = [r for r in images if r.get("kept")]
    below = [r for r in images if r.get("kept") is False and r.get("similarity") is not None]
    failed = [r for r in images if r.get("status") not in (None, "success")]
    return {"kept": rng.sample(kept, min(per_kind, len(kept))),
            "dropped by the CLIP filter": rng.sample(below, min(per_kind, len(below))),
            "failed to download": rng.sample(failed, min(per_kind // 2, len(failed)))}


# -- the page ------------------------------------------------------------------------------------
def thresholds(cfg: RunConfig, views: dict[str, StageView]) -> dict[str, float]:
    en, other = cfg.clip.min_similarity_en, cfg.clip.min_similarity_other
    for m in views["clip"].markers:  # what the stage applied, when it says
        en = m.get("stats", {}).get("min_similarity_en", en)
        other = m.get("stats", {}).get("min_similarity_other", other)
    return {"en": float(en if en is not None else 0.28), "other": float(other if other is not None else 0.26),
            "none": float(other if other is not None else 0.26)}


def build_report(store: Store, max_shards: int = 32, grid: int = 12, progress: bool = False) -> str:
    if not store.exists(RUN_FILE):
        raise ReportError(f"{store.uri} holds no run (no {RUN_FILE})")
    cfg = RunConfig.load(store)
    views = read_stages(store)
    samples = read_samples(store, views, max_shards, progress)
    from clipfleet.producer.report_page import Page
    page = Page(f"clipfleet report: {store.uri}")
    page.header(cfg, views, samples)
    page.comparison(views, samples)
    page.funnel(views)
    page.languages(views, samples)
    page.similarity(samples, thresholds(cfg, views))
    page.tags(samples)
    page.sizes(samples, cfg.download.image_size)
    page.throughput(views)
    page.index(store)
    page.grid(store, samples, grid)
    return page.html()


def write_report(store_uri: str, out: str, max_shards: int = 32, grid: int = 12) -> dict:
    store = Store(store_uri)
    page = build_report(store, max_shards=max_shards, grid=grid, progress=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return {"out": out, "bytes": len(page.encode())}
