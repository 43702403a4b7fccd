"""The README's benchmark table, regenerated from .bench/results.json in one command:

    .venv/bin/python -m bench.readme            # rewrite README.md between its bench markers
    .venv/bin/python -m bench.readme --print    # print the table only

Each row says what was compared, the numbers and the ratio, and the command that gives it;
the table's heading names the machine, the date and the scale of the run, so a quick
`--scale` check is never read as a measurement. A bench missing from the file is a row saying so.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench table: begin (python -m bench.readme) -->", "<!-- bench table: end -->"


def _x(value) -> str:
    return f"**{value:.2f}×**" if isinstance(value, (int, float)) else "–"


def _n(value, digits: int = 0) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, (int, float)) else "–"


def extract(r: dict) -> list[tuple[str, str, str]]:
    return [("extract", "a cc2dataset-style loop (fastwarc, pysimdjson, md5 uid) plus fastText lid.176 on each pair, "
             "same sandbox WATs, one process",
             f"{_n(r.get('clipfleet_records_per_s'))} vs {_n(r.get('cc2dataset_style_records_per_s'))} records/s: "
             f"{_x(r.get('extract_vs_cc2dataset_ratio'))} (goal ≥ 1.5); against the loop without language ID "
             f"({_n(r.get('cc2dataset_style_no_lid_records_per_s'))}/s) {_x(r.get('extract_vs_cc2dataset_no_lid_ratio'))}; "
             f"bare parse floor {_n(r.get('bare_parse_records_per_s'))}/s; ours includes hygiene, Redis dedup, parquet")]


def download(r: dict) -> list[tuple[str, str, str]]:
    setup = f"{r.get('processes')} processes × {r.get('threads')} threads, {_n(r.get('samples'))} images, best of several"
    return [("download", f"img2dataset 1.47 in-process, same URLs from nginx on 127.0.0.1, 256 px border jpg q95, {setup}",
             f"{_n(r.get('clipfleet_samples_per_s'))} vs {_n(r.get('img2dataset_samples_per_s'))} samples/s: "
             f"{_x(r.get('ratio_clipfleet_over_img2dataset'))}"),
            ("download", "a decode → resize → encode loop over the same bytes in memory (the floor)",
             f"floor {_n(r.get('floor_samples_per_s'))} samples/s; floor / stage {_x(r.get('ratio_floor_over_clipfleet'))} "
             "(goal ≤ 1.25)")]


def phash(r: dict) -> list[tuple[str, str, str]]:
    return [("download: perceptual hash", f"download's CPU side (decode, resize, encode, hash) with and without the "
             f"pHash, {_n(r.get('samples'))} sandbox images in memory, one core, CPU time",
             f"{r.get('phash_us')} µs a picture; {100 * r.get('phash_share_of_download_cpu_ratio', 0):.1f}% of "
             f"{_n(r.get('download_cpu_side_per_s'))} samples/s per core (goal ≤ 10%)"
             + (f"; {100 * r['phash_share_of_stage_per_core_ratio']:.1f}% of the stage's per-core rate (bench.download)"
                if "phash_share_of_stage_per_core_ratio" in r else ""))]


def polite(r: dict) -> list[tuple[str, str, str]]:
    rows = [("download, whole process", f"`img2dataset` vs `clipfleet run --urls … --until download` (fleet start-up "
             f"included), both with their defaults, {_n(r.get('samples'))} images from nginx on 127.0.0.1",
             f"{r.get('img2dataset_defaults_s')} s vs {r.get('clipfleet_defaults_s')} s: "
             f"{_x(r.get('ratio_img2dataset_time_over_clipfleet_time'))} (goal ≥ 2)")]
    if r.get("large_samples"):
        rows.append(("download, whole process", f"the same at {_n(r.get('large_samples'))} images",
                     f"{r.get('large_img2dataset_defaults_s')} s vs {r.get('large_clipfleet_defaults_s')} s: "
                     f"{_x(r.get('ratio_large_img2dataset_time_over_clipfleet_time'))} (goal ≥ 2)"))
    rows += [("politeness: capacity-limited host", f"a host taking {r.get('capacity_per_s')} requests/s, "
              f"{_n(r.get('capacity_samples'))} images, defaults",
              f"served {_x(r.get('ratio_achieved_over_capacity'))} its capacity (goal ≥ 0.7), "
              f"{100 * r.get('share_429', 0):.1f}% 429s (goal ≤ 10%)"),
             ("politeness: robots.txt", f"{r.get('robots_hosts')} hosts, with and without --ignore-robots-txt",
              f"{r.get('robots_requests_per_host')} request and {1000 * r.get('robots_s_per_host', 0):.0f} ms per host; "
              f"run {r.get('robots_run_s')} s vs {r.get('ignore_robots_run_s')} s")]
    return rows


def clip(r: dict) -> list[tuple[str, str, str]]:
    # bf16 is measured only where the CPU has it natively; the bench says so by its keys
    bf16 = "stage_bf16_samples_per_s" in r
    return [("clip", f"clip-retrieval 2.45 `inference` (own venv under .bench/, fp32 on CPU, marginal rate), "
             f"the same {r.get('model', 'ViT-B-32 random weights')}, batch {r.get('batch_size')}, {r.get('samples')} samples",
             f"fp32 both: {_n(r.get('stage_fp32_samples_per_s'), 1)} vs {_n(r.get('clip_retrieval_samples_per_s'), 1)} "
             f"samples/s {_x(r.get('stage_fp32_vs_clip_retrieval_ratio'))} (goal ≥ 1.5); "
             + (f"stage in bf16 {_x(r.get('stage_vs_clip_retrieval_ratio'))}" if bf16 else "no bf16 on this CPU")),
            ("clip", "the bare image + text forward on pre-decoded tensors (the floor)",
             f"floor / stage {_x(r.get('floor_over_stage_fp32_ratio'))} fp32"
             + (f", {_x(r.get('floor_over_stage_bf16_ratio'))} bf16" if bf16 else "") + " (goal ≤ 1.25)")]


def tag(r: dict) -> list[tuple[str, str, str]]:
    keys = [k for k in r if "ratio" in k]
    return [("tag", "a pandas + mmh3 + webdataset script doing the same job on the same shard, CPU time",
             "; ".join(f"{k.replace('_ratio', '').replace('_', ' ')} {_x(r[k])}" for k in keys))]


def index(r: dict) -> list[tuple[str, str, str]]:
    return [("index", f"autofaiss 2.18 `build_index`, same {_n(r.get('vectors'))} × {r.get('dim')} float16 embeddings, "
             f"budget {r.get('memory')} ({r.get('index_key')}), same held-out queries",
             f"build {r.get('autofaiss_build_cpu_s')} vs {r.get('stage_build_cpu_s')} CPU s: "
             f"{_x(r.get('build_cpu_ratio (autofaiss / stage)'))}; recall@10 {_n(r.get('autofaiss_recall@10'), 3)} vs "
             f"{_n(r.get('stage_recall@10'), 3)}; +10%: add vs rebuild {_x(r.get('add_vs_rebuild_cpu_ratio (rebuild / add)'))} "
             "(goal ≥ 5)")]


def search(r: dict) -> list[tuple[str, str, str]]:
    keys = [k for k in r if "ratio" in k]
    return [("search", "clip-retrieval `clip back` and a bare faiss loop on the same index",
             "; ".join(f"{k.replace('_', ' ')} {_x(r[k])}" for k in keys))]


def scale(r: dict) -> list[tuple[str, str, str]]:
    d, st = r.get("dedup") or {}, r.get("state") or {}
    sizes = sorted(int(k.split("_")[1]) for k in st if k.startswith("local_"))
    biggest = sizes[-1] if sizes else None
    local, s3 = st.get(f"local_{biggest}", {}), st.get(f"s3_{biggest}", {})
    return [("dedup claims", "Redis's own memory figures after claiming the URLs of a run (goal ≤ 10 B a URL)",
             f"**{_n(d.get('bytes_per_url'), 2)} B per URL** at {_n(d.get('urls'))} URLs; "
             f"{d.get('false_drops')} false drops"),
            ("run state", f"status, a progress tick and one index task's store calls at "
             f"{', '.join(_n(n) for n in sizes)} shards × 4 stages (goal: status < 5 s local, < 20 s S3 at 100k; "
             "calls per task constant)",
             f"at {_n(biggest)}: status **{local.get('status_s')} s** local (first, reading every marker: "
             f"{local.get('status_first_s')} s), **{s3.get('status_s')} s** S3 (moto); tick {local.get('tick_s')} s; "
             f"store calls per task {sorted({v.get('task_store_ops') for v in st.values() if isinstance(v, dict) and 'task_store_ops' in v})}")]


ROWS = {"bench.extract": extract, "bench.download": download, "bench.phash": phash, "bench.polite": polite, "bench.clip": clip,
        "bench.tag": tag, "bench.index": index, "bench.search": search, "bench.scale": scale}


def table(results: dict) -> str:
    runs = [r["_run"] for r in results.values() if isinstance(r, dict) and "_run" in r]
    dates = sorted({run["date"][:10] for run in runs})
    machines = sorted({f"{run['cpu']}, {run['cores']} cores" for run in runs})
    scales = sorted({run["scale"] for run in runs})
    lines = [f"Measured {' to '.join(dates[::max(1, len(dates) - 1)]) or '(never)'} on {'; '.join(machines) or '?'}"
             + ("" if scales == [1.0] else f", at scale {', '.join(map(str, scales))} (a quick check, not a measurement)")
             + "; regenerate with `python -m bench.readme` after `make bench`.", "",
             "| stage | compared with | result | command |", "|---|---|---|---|"]
    for name, rows in ROWS.items():
        r = results.get(name)
        if not r:
            lines.append(f"| {name[6:]} | – | not in .bench/results.json | `python -m bench {name}` |")
            continue
        run = r.get("_run", {})
        when = f" ({run['date']}, load {run.get('load_average_1m')})" if run else ""
        for stage, compared, result in rows(r):
            command = run.get("command") or f"python -m bench {name}"
            lines.append(f"| {stage} | {compared} | {result}{when} | `{command.strip()}` |")
    gpu = results.get("bench.gpu")
    lines.append("| clip, embed on a GPU | `bench/gpu.py`: B/32 and L/14 through the stage's path, nvjpeg, fp16 | "
                 + ("; ".join(f"{k} {v}" for k, v in gpu.items() if "per_s" in k) if gpu else
                    "not measured: no GPU on this machine; `python -m bench.gpu --cpu` checks its path")
                 + " | `python -m bench.gpu` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import json
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / ".bench" / "results.json"))
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--print", action="store_true", help="print the table, leave README.md alone")
    args = parser.parse_args(argv)
    path = Path(args.results)
    if not path.exists():
        print(f"no {path}: run `make bench` (or `python -m bench`) first", file=sys.stderr)
        return 1
    text = table(json.loads(path.read_text()))
    if args.print:
        print(text)
        return 0
    readme = Path(args.readme)
    old = readme.read_text()
    if BEGIN not in old or END not in old:
        print(f"{readme} has no bench table markers ({BEGIN} ... {END})", file=sys.stderr)
        return 1
    head, rest = old.split(BEGIN, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")
    print(f"rewrote the benchmark table of {readme} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
