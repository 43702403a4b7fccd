"""`clipfleet report`: a run as one self-contained HTML page, the way LAION's blog showed its own.

It reads only what the stages published: the markers (counts, durations; every marked shard),
and the tables of a spread of marked shards (`--max-shards` of each kind, evenly spaced, so a
run of 500 000 shards reports in minutes; the page says how many were read). A shard without a
marker is not read, so a running run reports what is finished so far. Plots are PNGs inline
(producer/report_plots.py); the page has no script and loads nothing.
"""
from __future__ import annotations

import base64
import html
import io
import random
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipfleet.producer import counts, report_plots as plots
from clipfleet.shared import layout
from clipfleet.shared.pipeline import STAGES
from clipfleet.shared.runconfig import RUN_FILE, RunConfig
from clipfleet.shared.storage import Store

# Samples in and out for stages producer/counts.py does not map (their own stat names).
EXTRA_SAMPLE_KEYS = {"clip": ("samples", "kept"), "embed": ("vectors", "vectors"), "tag": ("tagged", "published"),
                     "index": ("vectors", "vectors")}
INDEX_INFOS = {"image": f"{layout.INDEX}/infos.json", "text": f"{layout.INDEX}/text/infos.json"}
NOT_DROPS = {"politeness", "judged_by"}  # groups of counts that are no reason a sample was lost
# What LAION-5B reported (blog and paper), shown beside the run's numbers.
LAION_LANGUAGES = {"en": 2.32e9, "other": 2.26e9, "none": 1.27e9}
LAION_FACTS = [
    ("candidates kept by the CLIP filter", "about 10% (50+ billion candidates to 5.85 billion)"),
    ("English / other / no language", "2.32 B / 2.26 B / 1.27 B (40% / 39% / 22%)"),
    ("punsafe > 0.5", "2.9% to 3.3% per bucket"),
    ("pwatermark > 0.8", "4% to 6% per bucket"),
]


class ReportError(ValueError):
    """The store cannot be reported on (no run there)."""


@dataclass
class StageView:
    name: str
    markers: list[dict]
    dead: list[dict]
    totals: dict = field(default_factory=dict)
    samples_in: int | None = None
    samples_out: int | None = None

    @property
    def drops(self) -> list[tuple[str, int]]:
        total = {k: v for k, v in self.totals.items() if k not in NOT_DROPS}
        return counts.drop_reasons(total, top=12)

    def work_s(self) -> float:
        return sum(m.get("duration_s") or 0 for m in self.markers)

    def span_s(self) -> float:
        spans = [(m["started_at"], m["finished_at"]) for m in self.markers
                 if m.get("started_at") and m.get("finished_at")]
        return max(f for _, f in spans) - min(s for s, _ in spans) if spans else 0.0


def sample_counts(stage: str, stats: dict) -> tuple[int | None, int | None]:
    n_in, n_out = counts.samples_in(stage, stats), counts.samples_out(stage, stats)
    if n_in is None and stage in EXTRA_SAMPLE_KEYS:
        key_in, key_out = EXTRA_SAMPLE_KEYS[stage]
        n_in, n_out = stats.get(key_in), stats.get(key_out)
    return n_in, n_out


def read_stages(store: Store, threads: int = 16) -> dict[str, StageView]:
    views = {}
    with ThreadPoolExecutor(threads) as pool:  # one small read per marker: S3 wants them in parallel
        for stage in STAGES:
            names = sorted(store.done(stage))
            markers = [m for m in pool.map(lambda n, s=stage: _read_marker(store, s, n), names) if m]
            view = StageView(stage, markers, store.deadletters(stage), counts.totals(markers))
            pairs = [sample_counts(stage, m.get("stats") or {}) for m in markers]
            if pairs and any(p[0] is not None for p in pairs):
                view.samples_in = sum(p[0] or 0 for p in pairs)
                view.samples_out = sum(p[1] or 0 for p in pairs) if any(p[1] is not None for p in pairs) else None
            views[stage] = view
    return views


def _read_marker(store: Store, stage: str, name: str) -> dict | None:
    try:
        return store.read_json(f"_markers/{stage}/{name}.json")
    except (FileNotFoundError, ValueError):  # removed or half-visible meanwhile: the next report has it
        return None


def spread(shards: list[int], n: int) -> list[int]:
    """n shards evenly spaced over the run (all of them when there are fewer)."""
    if len(shards) <= n:
        return list(shards)
    step = len(shards) / n
    return [shards[int(i * step)] for i in range(n)]


def _shard_ids(view: StageView) -> list[int]:
    return sorted(int(m["shard"]) for m in view.markers if isinstance(m.get("shard"), int))


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


def language_bucket(language) -> str:
    return "en" if language == "en" else ("none" if not language else "other")


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
    page = Page(f"clipfleet report: {store.uri}")
    page.header(cfg, views, samples)
    page.funnel(views)
    page.languages(views, samples)
    page.similarity(samples, thresholds(cfg, views))
    page.tags(samples)
    page.sizes(samples, cfg.download.image_size)
    page.throughput(views)
    page.index(store)
    page.grid(store, samples, grid)
    return page.html()


def _e(value) -> str:
    return html.escape(str(value))


def _bytes(n) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return "–"


def _n(value) -> str:
    return "–" if value is None else (f"{value:,}" if isinstance(value, int) else f"{value:,.1f}")


class Page:
    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def section(self, title: str, anchor: str) -> None:
        self.add(f'<h2 id="{anchor}">{_e(title)}</h2>')

    def figure(self, uri: str, alt: str, caption: str = "") -> None:
        self.add(f'<figure><img class="plot" src="{uri}" alt="{_e(alt)}">'
                 + (f"<figcaption>{_e(caption)}</figcaption>" if caption else "") + "</figure>")

    def note(self, text: str) -> None:
        self.add(f'<p class="note">{_e(text)}</p>')

    def table(self, head: list[str], rows: list[list]) -> None:
        cells = "".join(f"<th>{_e(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
        self.add(f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>")

    def header(self, cfg: RunConfig, views, samples: Samples) -> None:
        last = next((s for s in reversed(STAGES) if views[s].markers), None)
        until = cfg.until
        state = "finished" if last == until and not views[until].dead else "running or stopped early"
        self.add(f"<h1>{_e(self.title)}</h1>")
        self.add(f'<p class="note">made {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}; '
                 f"run created {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(cfg.created_at))}; "
                 f"{len(cfg.inputs)} {cfg.input_kind} inputs, until {until}; state: {state}</p>")
        self.add("<nav>" + " · ".join(f'<a href="#{a}">{t}</a>' for a, t in (
            ("funnel", "funnel"), ("languages", "languages"), ("similarity", "similarity"), ("tags", "tags"),
            ("sizes", "image sizes"), ("throughput", "throughput"), ("index", "index"),
            ("samples", "samples"))) + "</nav>")
        rows = [["inputs", ", ".join(cfg.inputs[:3]) + (" …" if len(cfg.inputs) > 3 else "")],
                ["CLIP filter", f"{cfg.clip.filter_model} (en ≥ {cfg.clip.min_similarity_en}), "
                                f"{cfg.clip.multilingual_filter_model} (others ≥ {cfg.clip.min_similarity_other})"],
                ["embeddings", cfg.embed.embed_model],
                ["images", f"{cfg.download.image_size} px, {cfg.download.resize_mode}, {cfg.download.encode_format}"]]
        if samples.tar_images:
            rows.append(["stored bytes per image", f"{samples.tar_bytes / samples.tar_images / 1024:,.1f} KiB "
                                                   f"(images/ tars of {len(samples.shards['download'])} shards)"])
        self.table(["run", ""], rows)
        self.table(["stage", "shards done", "dead", "samples in", "samples out", "samples/s (wall)",
                    "samples/s per worker"],
                   [[s, len(v.markers), len(v.dead), _n(v.samples_in), _n(v.samples_out),
                     _n(v.samples_in / v.span_s()) if v.samples_in and v.span_s() > 0 else "–",
                     _n(v.samples_in / v.work_s()) if v.samples_in and v.work_s() > 0 else "–"]
                    for s, v in views.items()])
        for stage, view in views.items():
            for d in view.dead[:10]:
                self.note(f"dead {stage} shard {d.get('shard')}: {d.get('error')}")
        for problem in samples.problems:
            self.add(f'<p class="problem">{_e(problem)}</p>')

    def funnel(self, views) -> None:
        self.section("Funnel: samples in and out of every stage, and why the rest were dropped", "funnel")
        rows = [(s, v.samples_in, v.samples_out) for s, v in views.items() if v.samples_in is not None]
        if not rows:
            self.note("no stage has finished a shard yet")
            return
        self.figure(plots.funnel(rows), "funnel", "in: samples a stage was given; out: what it passed on "
                                                  "(extract: <img> links in, pairs out)")
        for stage, view in views.items():
            if view.drops:
                lost = (view.samples_in or 0) - (view.samples_out or 0)
                self.add(f"<h3>{_e(stage)}: {_n(lost)} dropped</h3>")
                self.table(["reason", "samples"], [[r, f"{n:,}"] for r, n in view.drops])

    def languages(self, views, samples: Samples) -> None:
        self.section("Language split", "languages")
        split = {}
        extract = views["extract"].totals
        if any(k.startswith("lang_") for k in extract):
            split["candidates (extract)"] = {b: extract.get(f"lang_{b}", 0) for b in plots.BUCKETS}
        ok = [r for r in samples.images if r.get("status") == "success"]
        if ok:
            split["downloaded"] = Counter(language_bucket(r.get("language")) for r in ok)
        kept = [r for r in ok if r.get("kept")]
        if kept:
            split["kept by CLIP"] = Counter(language_bucket(r.get("language")) for r in kept)
        if not split:
            self.note("no language counts yet")
            return
        self.figure(plots.languages(split, LAION_LANGUAGES), "language split",
                    "extract counts every marked segment; downloaded and kept come from the shards read")
        self.table(["bucket"] + list(split), [[plots.BUCKET_LABELS[b]] + [f"{split[w].get(b, 0):,}" for w in split]
                                              for b in plots.BUCKETS])

    def similarity(self, samples: Samples, limits: dict[str, float]) -> None:
        self.section("Image-text similarity per language bucket", "similarity")
        values = {}
        for r in samples.images:
            if r.get("similarity") is not None:
                values.setdefault(language_bucket(r.get("language")), []).append(r["similarity"])
        if not values:
            self.note("no shard has been through the CLIP filter yet")
            return
        self.figure(plots.similarity({b: np.array(v) for b, v in values.items()}, limits), "similarity",
                    f"from the clip tables of {len(samples.shards['clip'])} shards; English is judged against "
                    f"{limits['en']:.2f}, other and no language against {limits['other']:.2f}")

    def tags(self, samples: Samples) -> None:
        self.section("punsafe, pwatermark and aesthetic scores", "tags")
        columns = {c: np.array(samples.tags[c]) for c in ("punsafe", "pwatermark", "aesthetic") if samples.tags.get(c)}
        if not columns:
            self.note("no shard has been tagged yet (or every tag column is null: see run.json tag.null_columns)")
        else:
            self.figure(plots.tag_histograms(columns), "tag scores",
                        f"kept samples of {len(samples.shards['tag'])} tagged shards; dashed: LAION's thresholds "
                        f"(punsafe {plots.LAION_PUNSAFE}, pwatermark {plots.LAION_PWATERMARK}, aesthetic 5 and 6)")
        missing = [c for c in ("punsafe", "pwatermark", "aesthetic") if c not in columns]
        if columns and missing:
            self.note(f"no values for {', '.join(missing)} (null columns: the tag stage had no head for them)")
        rows = [[f"{c} > {t}", f"{100 * (columns[c] > t).mean():.2f}%" if c in columns else "–", laion]
                for c, t, laion in (("punsafe", plots.LAION_PUNSAFE, "2.9% to 3.3%"),
                                    ("pwatermark", plots.LAION_PWATERMARK, "4% to 6%"))]
        self.table(["share of kept samples", "this run", "LAION-5B"], rows)

    def sizes(self, samples: Samples, image_size: int) -> None:
        self.section("Image sizes", "sizes")
        ok = [r for r in samples.images if r.get("status") == "success" and r.get("original_width")]
        if not ok:
            self.note("no image downloaded yet")
            return
        original = np.array([max(r["original_width"], r["original_height"] or 0) for r in ok], float)
        stored = np.array([max(r.get("width") or 0, r.get("height") or 0) for r in ok], float)
        self.figure(plots.image_sizes(original, stored, image_size), "image sizes",
                    f"{len(ok):,} downloaded images; median original longest side {np.median(original):.0f} px")

    def throughput(self, views) -> None:
        self.section("Throughput over time", "throughput")
        starts = [m["started_at"] for v in views.values() for m in v.markers if m.get("started_at")]
        if not starts:
            self.note("no shard finished yet")
            return
        origin, series = min(starts), {}
        for stage, view in views.items():
            done = sorted((m["finished_at"], sample_counts(stage, m.get("stats") or {})[0] or 0)
                          for m in view.markers if m.get("finished_at"))
            if done:
                series[stage] = (np.array([(f - origin) / 60 for f, _ in done]), np.cumsum([n for _, n in done]))
        self.figure(plots.throughput(series), "throughput", "each point is a shard's marker (finished_at); "
                                                            "samples counted as the stage's samples in")
        durations = [[s, len(v.markers), f"{v.work_s():,.1f}", f"{np.median([m.get('duration_s') or 0 for m in v.markers]):.2f}"]
                     for s, v in views.items() if v.markers]
        self.table(["stage", "shards", "worker seconds", "median seconds per shard"], durations)

    def index(self, store: Store) -> None:
        self.section("Serving index", "index")
        rows = []
        for modality, rel in INDEX_INFOS.items():
            try:
                infos = store.read_json(rel)
            except (FileNotFoundError, ValueError):
                continue
            latency = infos.get("latency_ms") or {}
            rows.append([modality, infos.get("index_key", "–"), infos.get("generation", "–"),
                         len(infos.get("shards") or []), _bytes(infos.get("size_bytes")),
                         infos.get("recall@1", "–"), infos.get("recall@10", "–"),
                         f"{latency.get('p50', '–')} / {latency.get('p99', '–')}"])
        if not rows:
            self.note("no serving index yet (the index is merged when every shard is indexed)")
            return
        self.table(["modality", "key", "generation", "shards", "size", "recall@1", "recall@10",
                    "ms per query p50 / p99"], rows)
        self.note("recall measured by the index stage on held-out text queries against exact search")

    def grid(self, store: Store, samples: Samples, per_kind: int) -> None:
        self.section("Samples kept and dropped", "samples")
        picked = pick_grid(samples.images, per_kind)
        if not any(picked.values()):
            self.note("no samples downloaded yet")
            return
        thumbs = thumbnails(store, [r for rows in picked.values() for r in rows if r.get("status") == "success"])
        for kind, rows in picked.items():
            if not rows:
                continue
            self.add(f"<h3>{_e(kind)}</h3><div class='grid'>")
            for r in rows:
                picture = (f'<img class="thumb" src="{thumbs[r["key"]]}" alt="{_e(r["key"])}">'
                           if r["key"] in thumbs else f'<div class="nothumb">{_e(r.get("error_message") or "no image")}</div>')
                meta = [f"lang {r.get('language') or 'none'}"]
                if r.get("similarity") is not None:
                    meta.append(f"sim {r['similarity']:.2f}")
                self.add(f'<div class="cell" data-key="{_e(r["key"])}" data-shard="{r["shard"]}">{picture}<p class="cap">{_e((r.get("caption") or "")[:140])}</p>'
                         f'<p class="meta">{_e(" · ".join(meta))}</p></div>')
            self.add("</div>")
        self.add("<h3>LAION-5B, for comparison</h3>")
        self.table(["", "LAION-5B"], [list(f) for f in LAION_FACTS])

    def html(self) -> str:
        return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(self.title)}</title>"
                f"<style>{STYLE}</style></head><body>{''.join(self.parts)}</body></html>")


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}.problem{color:#a33}.note{color:#666;font-size:.9em}figure{margin:.5em 0}figcaption{color:#666;font-size:.85em}
img.plot{max-width:100%}nav a{margin:0 .2em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(130px,1fr));gap:10px}
.cell{border:1px solid #eee;padding:4px}.cap{font-size:.8em;margin:.2em 0}.meta{font-size:.75em;color:#777;margin:0}
.nothumb{height:112px;display:flex;align-items:center;justify-content:center;background:#fafafa;color:#a33;font-size:.75em;text-align:center}
"""


def write_report(store_uri: str, out: str, max_shards: int = 32, grid: int = 12) -> dict:
    store = Store(store_uri)
    page = build_report(store, max_shards=max_shards, grid=grid, progress=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return {"out": out, "bytes": len(page.encode())}
