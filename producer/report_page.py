"""The report's page: its sections in order, as HTML with inline PNGs and thumbnails.

`Page` turns what producer/report.py read from the store into markup; it reads nothing itself
except, for the sample grid, the thumbnails of the few samples it shows.
"""
from __future__ import annotations

import html
import time
from collections import Counter

import numpy as np

from clipfleet.producer import report_plots as plots
from clipfleet.producer.report import INDEX_INFOS, LAION_FACTS, LAION_LANGUAGES, Samples, pick_grid, thumbnails
from clipfleet.shared.language import language_bucket
from clipfleet.shared.stages import REGISTRY
from clipfleet.shared.runconfig import RunConfig
from clipfleet.shared.storage import Store


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
        last = next((s for s in reversed(REGISTRY.names()) if views[s].rows), None)
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
                   [[s, len(v.rows), len(v.dead), _n(v.samples_in), _n(v.samples_out),
                     _n(v.samples_in / v.span_s()) if v.samples_in and v.span_s() > 0 else "–",
                     _n(v.samples_in / v.work_s()) if v.samples_in and v.work_s() > 0 else "–"]
                    for s, v in views.items()])
        for stage, view in views.items():
            for d in view.dead[:10]:
                self.note(f"dead {stage} shard {d.get('shard')}: {d.get('error')}")
        for problem in samples.problems:
            self.add(f'<p class="problem">{_e(problem)}</p>')

    def comparison(self, views, samples: Samples) -> None:
        """The few numbers LAION's blog led with, this run's beside them."""
        clip = views["clip"]
        keep = f"{100 * clip.samples_out / clip.samples_in:.1f}% of {clip.samples_in:,} judged" \
            if clip.samples_in else "–"
        candidates = views["extract"].samples_out
        if clip.samples_in and candidates:
            keep += f" ({100 * clip.samples_out / candidates:.1f}% of {candidates:,} candidates)"
        kept = Counter(language_bucket(r.get("language")) for r in samples.images if r.get("kept"))
        total = sum(kept.values())
        split = " / ".join(f"{100 * kept[b] / total:.0f}%" for b in plots.BUCKETS) if total else "–"
        tags = {c: np.array(samples.tags[c]) for c in ("punsafe", "pwatermark") if samples.tags.get(c)}
        unsafe = f"{100 * (tags['punsafe'] > 0.5).mean():.2f}%" if "punsafe" in tags else "–"
        mark = f"{100 * (tags['pwatermark'] > 0.8).mean():.2f}%" if "pwatermark" in tags else "–"
        ours = [keep, split, unsafe, mark]
        self.table(["at a glance", "this run", "LAION-5B"],
                   [[name, mine, theirs] for (name, theirs), mine in zip(LAION_FACTS, ours)])

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
        contaminated = views["download"].totals.get("contaminated") if "download" in views else None
        if contaminated:  # --decontaminate's default marks: the samples stay, with a column that says so
            self.note(f"download: {_n(contaminated)} samples match the decontamination set (--decontaminate): "
                      "kept, marked in images/ column contaminated")

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
        starts = [r.started_at for v in views.values() for r in v.rows.values() if r.started_at]
        if not starts:
            self.note("no shard finished yet")
            return
        origin, series = min(starts), {}
        for stage, view in views.items():
            done = sorted((r.finished_at, r.samples_in or 0) for r in view.rows.values() if r.finished_at)
            if done:
                series[stage] = (np.array([(f - origin) / 60 for f, _ in done]), np.cumsum([n for _, n in done]))
        self.figure(plots.throughput(series), "throughput", "each point is a shard's marker (finished_at); "
                                                            "samples counted as the stage's samples in")
        durations = [[s, len(v.rows), f"{v.work_s():,.1f}", f"{np.median([r.duration_s for r in v.rows.values()]):.2f}"]
                     for s, v in views.items() if v.rows]
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
        from clipfleet.workers.index.plan import DEDUP_INFO
        try:
            dedup = store.read_json(DEDUP_INFO)
        except (FileNotFoundError, ValueError):
            return
        action = "left out of dataset/" if dedup.get("dropped") else "marked with duplicate_of"
        semantic = f"cosine >= 1 - {dedup['eps']}" if dedup.get("eps") else "no semantic pairs"
        self.note(f"near-duplicates: {dedup['groups']} groups holding {dedup['samples']} samples; "
                  f"{dedup['duplicates']} {action} (pHash within {dedup['hamming']} bits, {semantic})")
        how = dedup.get("calibration") or {}
        if how.get("copies_measured"):
            self.note(f"thresholds calibrated on {how['copies_measured']} web copies of the run's own pictures "
                      f"(95% within {how['copy_bits_q95']} bits and cosine distance {how['copy_distance_q95']}); "
                      f"eps: {how['eps_from']}; see run.json near_duplicates")
        self.near_duplicate_groups(store)

    def near_duplicate_groups(self, store: Store, groups: int = 4, per_group: int = 6) -> None:
        """The largest few groups as thumbnails: the sample kept first, then what names it."""
        import io

        import pyarrow.parquet as pq

        from clipfleet.shared.layout import split_id
        from clipfleet.workers.index.plan import DEDUP_GROUPS
        try:
            rows = pq.read_table(io.BytesIO(store.read_bytes(DEDUP_GROUPS))).to_pylist()
        except FileNotFoundError:
            return
        members: dict[int, list[dict]] = {}
        for r in rows:
            members.setdefault(r["group"], []).append({**r, "shard": split_id(r["id"])[0]})
        biggest = sorted(members, key=lambda g: (-len(members[g]), g))[:groups]
        shown = {g: sorted(members[g], key=lambda r: (r["duplicate_of"] is not None, r["key"]))[:per_group]
                 for g in biggest}
        thumbs = thumbnails(store, [r for g in biggest for r in shown[g]])
        for g in biggest:
            self.add(f"<h3>near-duplicate group of {len(members[g])}</h3><div class='grid'>")
            for r in shown[g]:
                picture = (f'<img class="thumb" src="{thumbs[r["key"]]}" alt="{_e(r["key"])}">'
                           if r["key"] in thumbs else '<div class="nothumb">no image</div>')
                said = "kept" if r["duplicate_of"] is None else f"duplicate of {r['duplicate_of']}"
                self.add(f'<div class="cell" data-key="{_e(r["key"])}" data-shard="{r["shard"]}">{picture}'
                         f'<p class="meta">{_e(r["key"])} · {_e(said)}</p></div>')
            self.add("</div>")

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
