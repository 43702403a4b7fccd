"""`clipfleet plan`: what a run of N published samples in D days needs, from measured throughput.

Working back from the samples wanted: published = candidates x download success x CLIP keep
rate, so the plan knows how many candidates to extract, URLs to fetch, images to judge and
samples to embed; each queue's workers follow from its per-worker rate (`make bench`'s
.bench/results.json, a run's markers, or the stated defaults below, each with its source).
Every number it assumes is printed with where it came from, so a reader can replace any of them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

DAY = 86400.0


@dataclass
class Figure:
    value: float
    source: str


# Defaults, each with where it comes from. A run's markers or bench results replace them.
DEFAULTS = {
    "success_rate": Figure(0.70, "assumed: share of candidate URLs that download (img2dataset runs over "
                                 "LAION's lists saw 70-80% a year after the crawl)"),
    "keep_rate": Figure(5.85e9 / 50e9 / 0.70, "LAION-5B: 50+ billion candidates gave 5.85 billion pairs; "
                                              "at the success rate above, this share of downloads passed CLIP"),
    "pairs_per_segment": Figure(400_000, "ops/dedup.md: a Common Crawl WAT segment holds about 400k image links"),
    "extract_pairs_per_s": Figure(50_000, "assumed: one core, from the sandbox extract bench (12.7k records/s x "
                                          "4 pairs/record); pass --from-bench for this machine's figure"),
    "download_cpu_per_s": Figure(650, "measured: `make bench` download, 1310 samples/s on 2 processes over "
                                      "loopback (CPU bound, no network latency)"),
    "fetch_latency_s": Figure(1.0, "img2dataset's LAION-5B run: 1000 samples/s per 16-core node at 64 threads "
                                   "per process, i.e. about 1 s per image on the internet"),
    "download_threads": Figure(64, "--download-threads default"),
    "clip_gpu_per_s": Figure(1500, "assumed: ViT-B/32 fp16 filter on one A100-class GPU with JPEG decode on "
                                   "its host cores; measure with bench/gpu.py"),
    "embed_gpu_per_s": Figure(5.85e9 / (32 * 7 * DAY), "LAION-5B: ViT-L/14 embeddings of 5.85 billion samples on "
                                                       "32 A100s in a week"),
    "decode_per_core_per_s": Figure(933, "measured: `make bench` download floor, decode-resize-encode of the "
                                         "sandbox JPEGs at 1866/s on 2 cores (decode alone is cheaper)"),
    "tag_per_s": Figure(50_000, "assumed: MLP heads on 768-d embeddings, one core"),
    "bytes_per_image": Figure(None, "img2dataset's LAION-5B figure: 50 TB for 5.85 billion images at 256 px, "
                                    "scaled by (image size / 256)^2"),
    "download_bytes_per_image": Figure(120_000, "assumed: mean size of an image as served (1 Gbit/s per "
                                                "1000 samples/s, img2dataset's sizing)"),
    "wat_bytes": Figure(300e6, "assumed: a gzipped Common Crawl WAT file"),
    "embed_dim": Figure(768, "ViT-L/14 (the default --embed-model)"),
    "metadata_bytes_per_sample": Figure(450, "LAION-5B: 2.65 TB of metadata for 5.85 billion samples"),
    "index_bytes_per_vector": Figure(136, "assumed: 128-byte PQ codes + an 8-byte id (autofaiss's typical key "
                                          "for billions of vectors), image and text indices"),
    "dedup_bytes_per_url": Figure(8.24, "measured: `python -m bench.scale dedup`, INFO used_memory per URL "
                                        "after 10 M claims, redis-server 6.2.14 (ops/dedup.md)"),
    "politeness_bytes_per_host": Figure(278, "measured: redis-server 6.2 used_memory per host hash (20 000 hosts)"),
    "distinct_host_share": Figure(0.5, "assumed: share of fetches in a 10-minute window that go to a host not "
                                       "fetched from in that window (Common Crawl links seldom share a domain)"),
    "politeness_state_ttl_s": Figure(600, "DomainLimits.state_ttl: a host's state lives 10 min after its last use"),
    "utilisation": Figure(0.7, "assumed: workers busy 70% of the time (retries, stragglers, restarts)"),
    "cores_per_node": Figure(16, "as LAION's download nodes (c6i.4xlarge)"),
    "redis_node_gb": Figure(64, "assumed: the largest Redis node one would run"),
}


@dataclass
class Plan:
    samples: float
    days: float
    figures: dict[str, Figure]
    rows: dict = field(default_factory=dict)      # queue -> {work, rate, workers, ...}
    storage: dict = field(default_factory=dict)   # what -> bytes
    redis: dict = field(default_factory=dict)
    bandwidth: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"samples": self.samples, "days": self.days, "queues": self.rows, "storage_bytes": self.storage,
                "redis_bytes": self.redis, "bandwidth_bytes_per_s": self.bandwidth, "notes": self.notes,
                "assumptions": {k: asdict(v) for k, v in self.figures.items()}}


def make_plan(samples: float, days: float, measured: dict[str, Figure] | None = None,
              image_size: int = 256) -> Plan:
    if samples <= 0 or days <= 0:
        raise ValueError("--samples and --days must be positive")
    f = {**DEFAULTS, **(measured or {})}
    if f["bytes_per_image"].value is None:
        f["bytes_per_image"] = Figure(50e12 / 5.85e9 * (image_size / 256) ** 2, DEFAULTS["bytes_per_image"].source)
    v = {k: fig.value for k, fig in f.items()}
    plan = Plan(samples, days, f)
    seconds = days * DAY
    downloaded = samples / v["keep_rate"]
    candidates = downloaded / v["success_rate"]
    segments = candidates / v["pairs_per_segment"]

    # A download core is bound by its CPU once enough fetches wait on the network at once:
    # rate x latency of them (Little's law), as threads of one process or several processes.
    if v["fetch_latency_s"]:
        in_flight = math.ceil(v["download_cpu_per_s"] * v["fetch_latency_s"])
        fetch_what = f"URLs fetched (about {in_flight} in flight per core)"
        plan.notes.append(f"download: {in_flight} fetches in flight per core keep it busy at "
                          f"{v['fetch_latency_s']:.2f} s per image: --download-threads {in_flight}, or "
                          f"{math.ceil(in_flight / v['download_threads'])} processes of {v['download_threads']:.0f} "
                          "threads per core; the bench's rate is plain HTTP on loopback, TLS costs more CPU")
    else:
        fetch_what = "URLs fetched (rate measured with the network)"
    work = {
        "cpu-extract": (candidates, v["extract_pairs_per_s"], "candidate pairs", "core"),
        "cpu-download": (candidates, v["download_cpu_per_s"], fetch_what, "core"),
        "gpu-clip": (downloaded, v["clip_gpu_per_s"], "images judged", "GPU"),
        "gpu-embed": (samples, v["embed_gpu_per_s"], "samples embedded", "GPU"),
        "tagging": (samples, v["tag_per_s"], "samples tagged", "core"),
        "GPU hosts": (downloaded + samples, v["decode_per_core_per_s"], "images decoded for the GPUs", "core"),
    }
    for queue, (n, rate, what, unit) in work.items():
        needed = n / seconds
        workers = math.ceil(needed / (rate * v["utilisation"]))
        plan.rows[queue] = {"work": n, "what": what, "needed_per_s": needed, "per_worker_per_s": rate,
                            "workers": workers, "unit": unit}
    plan.rows["index-merge"] = {"work": samples, "what": "vectors added, then one merge", "needed_per_s": samples / seconds,
                                "per_worker_per_s": None, "workers": 1, "unit": "large-memory node"}
    plan.rows["cpu-extract"]["segments"] = segments

    dim = v["embed_dim"]
    plan.storage = {
        "images/ (every downloaded image)": downloaded * v["bytes_per_image"],
        "dataset/ (kept samples' tars + parquet)": samples * (v["bytes_per_image"] + v["metadata_bytes_per_sample"]),
        "embeddings/ (image + text, float16)": samples * dim * 2 * 2,
        "index/ (image + text)": samples * v["index_bytes_per_vector"] * 2,
        "urls/ (candidate URL shards)": candidates * 150,
    }
    claims = candidates * v["dedup_bytes_per_url"]
    fetches_per_s = candidates / seconds
    hosts = fetches_per_s * v["politeness_state_ttl_s"] * v["distinct_host_share"]
    plan.redis = {"dedup claims": claims, "politeness state": hosts * v["politeness_bytes_per_host"]}
    plan.bandwidth = {"images in": fetches_per_s * v["success_rate"] * v["download_bytes_per_image"],
                      "WAT files in": segments * v["wat_bytes"] / seconds,
                      "to the store": downloaded * v["bytes_per_image"] / seconds}
    if claims > v["redis_node_gb"] * 1e9:
        nodes = math.ceil(claims / (v["redis_node_gb"] * 1e9))
        plan.notes.append(f"dedup claims ({claims / 1e9:,.0f} GB) exceed one {v['redis_node_gb']:.0f} GB Redis node: "
                          f"spread them over {nodes}+ nodes with --dedup-redis (a node list or a Redis Cluster), "
                          "or run one store per crawl (ops/dedup.md)")
    plan.notes.append(f"{candidates:,.0f} candidates from about {segments:,.0f} WAT segments; "
                      f"{downloaded:,.0f} images downloaded and judged; {samples:,.0f} published")
    return plan


# -- measured figures ----------------------------------------------------------------------------
def from_bench(path: str) -> dict[str, Figure]:
    """Per-worker rates from `make bench`'s results.json (bench/__main__.py writes one dict per bench)."""
    try:
        with open(path) as fh:
            results = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read bench results {path}: {exc}") from exc
    out = {}
    ex = results.get("bench.extract") or {}
    if ex.get("clipfleet_records_per_s") and ex.get("wat_records") and ex.get("clipfleet_pairs_kept"):
        per_record = ex["clipfleet_pairs_kept"] / ex["wat_records"]
        out["extract_pairs_per_s"] = Figure(ex["clipfleet_records_per_s"] * per_record,
                                            f"{path}: extract {ex['clipfleet_records_per_s']:,} records/s on one core "
                                            f"x {per_record:.2f} pairs per record")
    dl = results.get("bench.download") or {}
    if dl.get("clipfleet_samples_per_s") and dl.get("processes"):
        out["download_cpu_per_s"] = Figure(dl["clipfleet_samples_per_s"] / dl["processes"],
                                           f"{path}: download {dl['clipfleet_samples_per_s']:,} samples/s on "
                                           f"{dl['processes']} processes over loopback")
        if dl.get("threads"):
            out["download_threads"] = Figure(dl["threads"], f"{path}: threads per process in the bench")
    tag = results.get("bench.tag") or {}
    if tag.get("l14_stage_tags_per_s_per_core"):
        out["tag_per_s"] = Figure(tag["l14_stage_tags_per_s_per_core"], f"{path}: tag stage, 768-d heads, one core")
    for name, key in (("bench.gpu", "clip_gpu_per_s"), ("bench.gpu", "embed_gpu_per_s")):
        gpu = results.get(name) or {}
        rate = gpu.get(key.replace("_gpu_per_s", "_samples_per_s"))
        if rate:
            out[key] = Figure(rate, f"{path}: {name} on {gpu.get('device', 'a GPU')}")
    dedup = (results.get("scale") or results.get("bench.scale") or {}).get("dedup") or {}
    if dedup.get("bytes_per_url"):
        out["dedup_bytes_per_url"] = Figure(dedup["bytes_per_url"], f"{path}: bench.scale dedup, INFO used_memory "
                                            f"per URL after {dedup.get('urls', 0):,} claims "
                                            f"(redis {dedup.get('redis_version', '?')}, {dedup.get('allocator', '?')})")
    if not out:
        raise ValueError(f"{path} holds no throughput this plan can use (run `make bench`)")
    return out


def from_store(uri: str) -> tuple[dict[str, Figure], list[str], int]:
    """Rates and rates of loss from a run's markers; (figures, notes, the run's image size)."""
    from clipfleet.producer.report import read_stages
    from clipfleet.shared.layout import RUN_FILE
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.shared.storage import Store
    store = Store(uri)
    if not store.exists(RUN_FILE):
        raise ValueError(f"{uri} holds no run (no {RUN_FILE})")
    cfg = RunConfig.load(store)
    views = read_stages(store)
    out, notes = {}, []

    def per_worker(stage: str) -> tuple[float, str] | None:
        view = views[stage]
        if not view.rows or not view.samples_in or view.work_s() <= 0:
            return None
        devices = sorted({str((m.get("stats") or {}).get("device")) for m in view.markers} - {"None"})
        return view.samples_in / view.work_s(), f"{uri}: {stage} markers, {view.samples_in:,} samples in " \
                                                 f"{view.work_s():,.0f} worker-seconds" + \
                                                 (f" on {', '.join(devices)}" if devices else "")

    ex, dl, cl = views["extract"], views["download"], views["clip"]
    if ex.rows:
        pairs = ex.totals.get("pairs", 0)
        out["pairs_per_segment"] = Figure(pairs / len(ex.rows), f"{uri}: pairs per extracted segment")
        rate = per_worker("extract")
        if rate and pairs:
            out["extract_pairs_per_s"] = Figure(pairs / ex.work_s(), rate[1].replace("samples", "links"))
    if dl.samples_in:
        out["success_rate"] = Figure(dl.samples_out / dl.samples_in, f"{uri}: downloaded / fetched, "
                                                                     f"{dl.samples_out:,} of {dl.samples_in:,}")
        rate = per_worker("download")
        if rate:  # a marker's duration is the process's wall time: its threads' network waits included
            out["download_cpu_per_s"] = Figure(rate[0], rate[1] + " (network waits included)")
            out["fetch_latency_s"] = Figure(None, f"{uri}: not applied, the measured rate includes the network")
    if cl.samples_in:
        out["keep_rate"] = Figure(cl.samples_out / cl.samples_in, f"{uri}: kept / judged by CLIP, "
                                                                  f"{cl.samples_out:,} of {cl.samples_in:,}")
    for stage, key in (("clip", "clip_gpu_per_s"), ("embed", "embed_gpu_per_s"), ("tag", "tag_per_s")):
        rate = per_worker(stage)
        if rate is None:
            continue
        on_gpu = "cuda" in rate[1]
        if stage == "tag" or on_gpu:
            out[key] = Figure(rate[0], rate[1])
        else:
            notes.append(f"{stage} ran on CPU in this run ({rate[0]:,.1f} samples/s per worker): the GPU rate "
                         "stays the default")
    dims = [(m.get("stats") or {}).get("dim") for m in views["embed"].markers]
    if any(dims):
        out["embed_dim"] = Figure(next(d for d in dims if d), f"{uri}: embed markers")
    sizes = _bytes_per_image(store, views)
    if sizes:
        out["bytes_per_image"] = Figure(*sizes)
    return out, notes, cfg.download.image_size


def _bytes_per_image(store, views) -> tuple[float, str] | None:
    from clipfleet.shared import layout
    total = images = 0
    for m in views["download"].markers[:64]:
        try:
            total += store.fs.size(store.path(layout.image_shard(m["shard"])))
        except (FileNotFoundError, KeyError):
            continue
        images += (m.get("stats") or {}).get("success", 0)
    return (total / images, f"{store.uri}: images/ tar bytes per stored image") if images else None


# -- printing ------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"


def render(plan: Plan) -> str:
    lines = [f"plan: {plan.samples:,.0f} published samples in {plan.days:g} days", "",
             f"{'queue':<14}{'work':>18}  {'needed/s':>10}  {'per worker/s':>12}  {'workers':>8}  what"]
    for queue, row in plan.rows.items():
        rate = "–" if row["per_worker_per_s"] is None else f"{row['per_worker_per_s']:,.0f}"
        lines.append(f"{queue:<14}{row['work']:>18,.0f}  {row['needed_per_s']:>10,.0f}  {rate:>12}  "
                     f"{row['workers']:>8,} {row['unit']}s  {row['what']}")
    cores = sum(r["workers"] for r in plan.rows.values() if r["unit"] == "core")
    gpus = sum(r["workers"] for r in plan.rows.values() if r["unit"] == "GPU")
    per_node = plan.figures["cores_per_node"].value
    lines += ["", f"CPU: {cores:,} cores = {math.ceil(cores / per_node):,} nodes of {per_node:.0f} cores; "
                  f"GPUs: {gpus:,}"]
    lines += ["", "storage:"] + [f"  {k:<42}{human_bytes(b):>14}" for k, b in plan.storage.items()]
    lines += [f"  {'total':<42}{human_bytes(sum(plan.storage.values())):>14}"]
    lines += ["", "Redis memory:"] + [f"  {k:<42}{human_bytes(b):>14}" for k, b in plan.redis.items()]
    lines += ["", "bandwidth (sustained):"] + [f"  {k:<42}{human_bytes(b) + '/s':>14}  ({b * 8 / 1e9:,.2f} Gbit/s)"
                                               for k, b in plan.bandwidth.items()]
    lines += ["", "notes:"] + [f"  - {n}" for n in plan.notes]
    lines += ["", "assumptions (value: source):"]
    for name, fig in plan.figures.items():
        value = "–" if fig.value is None else f"{fig.value:,.4g}"
        lines.append(f"  {name} = {value}: {fig.source}")
    return "\n".join(lines)


def run_plan(args) -> int:
    measured, notes, image_size = {}, [], 256
    if getattr(args, "from_bench", None):
        measured = from_bench(args.from_bench)
    elif getattr(args, "store", None):
        measured, notes, image_size = from_store(args.store)
    if getattr(args, "image_size", None):
        image_size = args.image_size
        if "bytes_per_image" in measured:
            notes.append(f"--image-size {image_size}: the run's measured bytes per image are used as they are")
    plan = make_plan(args.samples, args.days, measured, image_size=image_size)
    plan.notes += notes
    print(json.dumps(plan.as_dict(), indent=1) if args.json else render(plan))
    return 0
