"""Politeness benchmark: what the default pace costs on a fast host, and what it gets from a slow one.

Three rows, side by side in one run, every command with its defaults (as a new user runs them):
- fast host: SAMPLES images from nginx on 127.0.0.1; `img2dataset --url_list ...` against
  `clipfleet run --urls ... --until download --allow-private-addresses`, each timed as a whole
  process (start to exit: clipfleet starts its own Redis and workers inside that time); then
  the same at LARGE_SAMPLES (the same images under distinct URLs, `?n=i`, which nginx serves
  as the file: both tools fetch every one);
- capacity-limited host: CAPACITY_SAMPLES images from a sandbox host that takes CAPACITY
  requests/s (token bucket, 429 + Retry-After: 1 above it, latency growing with load);
  clipfleet with its defaults; the rate the host itself served (first to last 200) over its
  capacity, and the share of requests it refused with 429;
- robots.txt: ROBOTS_HOSTS hosts (127.0.0.2, 127.0.0.3, ...) of ROBOTS_PER_HOST images each, with
  a robots.txt, through clipfleet with and without --ignore-robots-txt: robots.txt requests per
  host as the hosts counted them, seconds per host the workers spent on them, and whole-run times.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.sizes import size

SAMPLES = size("POLITE_SAMPLES")
CAPACITY = 60.0
CAPACITY_SAMPLES = size("POLITE_CAPACITY_SAMPLES")
ROBOTS_HOSTS = 10
ROBOTS_PER_HOST = size("POLITE_ROBOTS_PER_HOST")
LARGE_SAMPLES = size("POLITE_LARGE_SAMPLES")
REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, start_new_session=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[2:4]} failed: {(proc.stdout + proc.stderr)[-2000:]}")
    return seconds


def clipfleet_run(urls: Path, store: Path, env: dict, *flags: str) -> float:
    return timed([sys.executable, "-m", "clipfleet.producer.cli", "run", "--urls", str(urls), "--store",
                  str(store), "--until", "download", "--allow-private-addresses", *flags], env)


def marker_stats(store: Path) -> list[dict]:
    return [json.loads(p.read_text())["stats"] for p in sorted((store / "_markers/download").glob("*.json"))]


def successes(store: Path) -> int:
    return sum(s.get("success", 0) for s in marker_stats(store))


def write_urls(path: Path, urls: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), path)


def fast_host(img2dataset: str, urls: Path, work: Path, env: dict) -> tuple[float, int, float, int, float]:
    """(img2dataset s, its successes, clipfleet s, its successes, clipfleet's politeness wait
    thread-s): both whole processes with their defaults on the same URL list."""
    i2d_s = timed([img2dataset, "--url_list", str(urls), "--input_format", "parquet",
                   "--output_folder", str(work / "i2d")], env)
    i2d_ok = sum(json.loads(p.read_text())["successes"] for p in (work / "i2d").glob("*_stats.json"))
    ours_s = clipfleet_run(urls, work / "store", env)
    stats = marker_stats(work / "store")
    shutil.rmtree(work, ignore_errors=True)  # the images: GBs at large sizes
    return i2d_s, i2d_ok, ours_s, sum(s.get("success", 0) for s in stats), \
        sum(s.get("politeness_wait_s", 0) for s in stats)


def main() -> dict:
    import pyarrow.parquet as pq
    from bench.download import start_nginx, stop
    from clipfleet.producer.fleet import free_port
    from clipfleet.sandbox.hosts import TestHost
    from clipfleet.sandbox.web import make_sandbox

    work = Path(tempfile.mkdtemp(prefix="clipfleet-bench-polite-"))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "CLIPFLEET_STATE_DIR": str(work / "state")}
    nginx = None
    result: dict = {}
    try:
        port = free_port()
        print(f"making a sandbox world of {SAMPLES} images...", flush=True)
        make_sandbox(work / "world", samples=SAMPLES, port=port, wat_files=1)
        urls = pq.read_table(work / "world/ground_truth/images.parquet").column("url").to_pylist()
        paths = [urlsplit(u).path for u in urls]
        (work / "world/web/robots.txt").write_text("User-agent: *\nDisallow: /private/\n")
        write_urls(work / "fast.parquet", urls)
        (work / "nginx").mkdir()
        nginx = start_nginx(work / "world/web", port, work / "nginx")

        # -- fast host: whole processes, both with their defaults
        img2dataset = shutil.which("img2dataset", path=str(Path(sys.executable).parent)) or "img2dataset"
        i2d_s, i2d_ok, ours_s, ours_ok, fast_wait = fast_host(img2dataset, work / "fast.parquet", work / "fast", env)
        if LARGE_SAMPLES:
            write_urls(work / "large.parquet", [f"{urls[i % len(urls)]}?n={i}" for i in range(LARGE_SAMPLES)])
            large = fast_host(img2dataset, work / "large.parquet", work / "large", env)
            result.update({"large_samples": LARGE_SAMPLES, "large_img2dataset_defaults_s": round(large[0], 1),
                           "large_clipfleet_defaults_s": round(large[2], 1), "large_img2dataset_successes": large[1],
                           "large_clipfleet_successes": large[3],
                           "ratio_large_img2dataset_time_over_clipfleet_time": round(large[0] / large[2], 2)})

        # -- capacity-limited host
        with TestHost(work / "world/web", capacity=CAPACITY, burst=CAPACITY, base_latency=0.005) as host:
            write_urls(work / "capacity.parquet",
                       [f"{host.url}{paths[i % len(paths)]}?n={i}" for i in range(CAPACITY_SAMPLES)])
            cap_s = clipfleet_run(work / "capacity.parquet", work / "capacity-store", env)
            served = host.stats[200]
            refused = host.stats[429]
            span = host.last_ok_at - host.first_ok_at
        cap_ok = successes(work / "capacity-store")
        achieved = (served - 1) / span if span > 0 else 0.0

        # -- robots.txt on many hosts
        hosts = [TestHost(work / "world/web", robots="User-agent: *\nDisallow: /private/\n",
                          host=f"127.0.0.{2 + i}").start() for i in range(ROBOTS_HOSTS)]
        try:
            write_urls(work / "robots.parquet", [f"{h.url}{paths[(i * ROBOTS_HOSTS + j) % len(paths)]}"
                                                 for j, h in enumerate(hosts) for i in range(ROBOTS_PER_HOST)])
            with_s = clipfleet_run(work / "robots.parquet", work / "robots-store", env)
            robots_requests = sum(len(h.robots_requests) for h in hosts)
            robots_s = sum(s.get("robots_txt_s", 0) for s in marker_stats(work / "robots-store"))
            without_s = clipfleet_run(work / "robots.parquet", work / "norobots-store", env, "--ignore-robots-txt")
        finally:
            for h in hosts:
                h.stop()
    finally:
        if nginx is not None:
            stop(nginx)
        shutil.rmtree(work, ignore_errors=True)

    result = {
        **result, "samples": SAMPLES, "img2dataset_defaults_s": round(i2d_s, 1), "clipfleet_defaults_s": round(ours_s, 1),
        "img2dataset_successes": i2d_ok, "clipfleet_successes": ours_ok, "politeness_wait_s": round(fast_wait, 1),
        "ratio_img2dataset_time_over_clipfleet_time": round(i2d_s / ours_s, 2),
        "capacity_per_s": CAPACITY, "capacity_samples": CAPACITY_SAMPLES, "capacity_successes": cap_ok,
        "capacity_achieved_per_s": round(achieved, 1), "capacity_run_s": round(cap_s, 1),
        "ratio_achieved_over_capacity": round(achieved / CAPACITY, 2),
        "share_429": round(refused / max(1, served + refused), 3),
        "robots_hosts": ROBOTS_HOSTS, "robots_requests_per_host": round(robots_requests / ROBOTS_HOSTS, 2),
        "robots_s_per_host": round(robots_s / ROBOTS_HOSTS, 4),
        "robots_run_s": round(with_s, 1), "ignore_robots_run_s": round(without_s, 1),
    }
    print(f"fast host (nginx, 127.0.0.1), {SAMPLES} images, each tool with its defaults, whole process:")
    print(f"  {'img2dataset 1.47':<30}{i2d_s:>7.1f} s  ({i2d_ok} ok)")
    print(f"  {'clipfleet run --urls':<30}{ours_s:>7.1f} s  ({ours_ok} ok; politeness wait "
          f"{fast_wait:.1f} thread-s)")
    print(f"  img2dataset time / clipfleet time = {result['ratio_img2dataset_time_over_clipfleet_time']:.2f}x"
          f"  (goal >= 2)")
    if LARGE_SAMPLES:
        print(f"  at {LARGE_SAMPLES} images: {result['large_img2dataset_defaults_s']:.1f} s vs "
              f"{result['large_clipfleet_defaults_s']:.1f} s ({result['large_img2dataset_successes']} and "
              f"{result['large_clipfleet_successes']} ok): "
              f"{result['ratio_large_img2dataset_time_over_clipfleet_time']:.2f}x  (goal >= 2)")
    print(f"capacity-limited host ({CAPACITY:g} requests/s, 429 above), {CAPACITY_SAMPLES} images, defaults:")
    print(f"  served {achieved:.1f}/s = {result['ratio_achieved_over_capacity']:.2f} of capacity (goal >= 0.7); "
          f"429 share {100 * result['share_429']:.1f}% (goal <= 10%); {cap_ok} ok")
    print(f"robots.txt, {ROBOTS_HOSTS} hosts x {ROBOTS_PER_HOST} images: {result['robots_requests_per_host']:g} "
          f"request(s) and {result['robots_s_per_host'] * 1000:.1f} ms per host; "
          f"run {with_s:.1f} s vs {without_s:.1f} s with --ignore-robots-txt")
    return result


if __name__ == "__main__":
    main()
