"""Download benchmark: samples per second on this machine, side by side in one run.

The same URL list (a sandbox world of SAMPLES images) is served by nginx on 127.0.0.1, then:
- img2dataset with the same settings: 256 px, border, jpg q95, webdataset, PROCESSES
  processes of THREADS threads, sha256, no EXIF, shards of SHARD_SIZE;
- clipfleet's download stage through the fleet: an embedded Redis and one cpu-download worker
  of PROCESSES processes, fed by the producer's own functions (what `clipfleet run --urls ...
  --until download --allow-private-addresses` does), with per-host politeness checked in
  Redis on every request (limits set high enough not to bind on a single host);
- the floor: a bare decode -> resize -> encode loop (clipfleet's resize_image) over the same
  bytes held in memory, in PROCESSES processes, no network and no writing.
Both tools are timed from the first task to the last shard written, with their processes
already started (img2dataset's own pool start is inside its call). The three runs are
interleaved REPEATS times and the best of each is kept, so a busy spell from other work on
this shared machine hits all of them alike.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

from bench.sizes import repeats, size

SAMPLES = size("DOWNLOAD_SAMPLES")
SHARD_SIZE = 500
PROCESSES = 2
THREADS = 64
REPEATS = repeats(5)
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- nginx

def ensure_nginx() -> str:
    found = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
    if found:
        return found
    print("nginx not found; installing it with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], check=True, env=env)
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_config(root: Path, port: int, workdir: Path) -> str:
    temp_paths = "\n".join(f"  {kind}_temp_path {workdir}/{kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # Root's nginx would serve as `nobody`, who cannot read a private temp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""{user}
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  types {{ image/jpeg jpg; image/png png; image/webp webp; }}
{temp_paths}
  server {{
    listen 127.0.0.1:{port};
    root {root};
  }}
}}
"""


def start_nginx(root: Path, port: int, workdir: Path) -> subprocess.Popen:
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(root, port, workdir))
    proc = subprocess.Popen([ensure_nginx(), "-c", str(conf), "-p", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}: {(workdir / 'error.log').read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
        except urllib.error.HTTPError:
            return proc  # it answers (403/404 for the directory): ready
        except OSError:
            time.sleep(0.1)
            continue
        return proc
    raise RuntimeError("nginx did not start within 20s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ----------------------------------------------------------------------------- the three runs

IMG2DATASET_SCRIPT = """
import json, sys, time
from img2dataset import download
args = json.loads(sys.argv[1])
started = time.perf_counter()
download(**args)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def run_img2dataset(url_list: Path, out: Path) -> float:
    args = dict(url_list=str(url_list), input_format="parquet", url_col="url", caption_col="caption",
                output_folder=str(out), output_format="webdataset", processes_count=PROCESSES,
                thread_count=THREADS, image_size=256, resize_mode="border", encode_format="jpg",
                encode_quality=95, number_sample_per_shard=SHARD_SIZE, extract_exif=False,
                compute_hash="sha256", timeout=10, retries=0, distributor="multiprocessing")
    proc = subprocess.run([sys.executable, "-c", IMG2DATASET_SCRIPT, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"},
                          start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def successes(folder: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in folder.glob("*_stats.json"))


def run_clipfleet(url_list: Path, store_dir: Path, fleet) -> float:
    from clipfleet.producer.feed import enqueue
    from clipfleet.producer.follow import follow
    from clipfleet.producer.register import first_tasks, register
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.shared.runstate import RunState
    from clipfleet.shared.storage import shard_name
    from clipfleet.shared.storage import Store
    from clipfleet.workers.app import make_app
    import redis
    store = Store(str(store_dir))
    cfg = RunConfig.make(store=store.uri, inputs=[str(url_list)], input_kind="urls", until="download",
                    shard_size=SHARD_SIZE, allow_private_addresses=True, download_threads=THREADS,
                    domain_max_concurrency=4 * THREADS * PROCESSES, domain_max_rate=0.0)
    register(store, cfg)
    first = first_tasks(store, cfg)  # URL shards written before the clock starts
    app, client = make_app(fleet.broker), redis.Redis.from_url(fleet.broker)
    started = time.time()  # the markers' clock
    enqueue(app, client, store, first)
    # Followed as `clipfleet run` follows (its poll interval): the end is read from the markers.
    state = follow(RunState(store, cfg, first={shard_name(t.shard) for t in first}), show_progress=False)
    if state[0].failed:
        raise RuntimeError(f"clipfleet: shards failed: {sorted(state[0].failed)}")
    # Until the last shard was written (its marker's time), not until the poll above saw it: that
    # is up to a poll interval later (polling faster costs this process CPU the workers need).
    return max(m["finished_at"] for m in store.markers("download")) - started


def _resize_all(paths: list[str]) -> float:
    from clipfleet.workers.download.options import DownloadOptions
    from clipfleet.workers.download.resize import resize_image
    import cv2
    cv2.setNumThreads(1)
    datas = [Path(p).read_bytes() for p in paths]
    opts = DownloadOptions(image_size=256, resize_mode="border", encode_format="jpg", encode_quality=95)
    started = time.perf_counter()
    for data in datas:
        resize_image(data, opts)
    return time.perf_counter() - started


def floor_seconds(paths: list[str]) -> float:
    """Wall time of PROCESSES processes each resizing its share, all started together.

    Spawned, not forked: a fork of a threaded process can inherit a held lock."""
    shares = [paths[i::PROCESSES] for i in range(PROCESSES)]
    with get_context("spawn").Pool(PROCESSES) as pool:
        pool.map(_resize_all, [shares[0][:20]] * PROCESSES)  # warm: imports, first decode
        started = time.perf_counter()
        pool.map(_resize_all, shares)
        return time.perf_counter() - started


FLOOR_SCRIPT = """
import json, sys
from pathlib import Path
from bench.download import floor_seconds
print(json.dumps({"seconds": floor_seconds(sorted(str(p) for p in Path(sys.argv[1]).iterdir()))}))
"""


def run_floor(image_dir: Path) -> float:
    """The floor over every file in `image_dir`."""
    # Each contender runs in a session of its own (img2dataset, the fleet's worker, this), so
    # the kernel's per-session CPU sharing (autogroup) treats them alike on a shared machine.
    proc = subprocess.run([sys.executable, "-c", FLOOR_SCRIPT, str(image_dir)], cwd=REPO,
                          capture_output=True, text=True, start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"floor loop failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


# ----------------------------------------------------------------------------- main

def main() -> dict:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from clipfleet.producer.fleet import free_port, start_fleet
    from clipfleet.sandbox.web import make_sandbox

    work = Path(tempfile.mkdtemp(prefix="clipfleet-bench-download-"))
    nginx = fleet = None
    # A SIGTERM still stops nginx and the fleet (the finally below), not just this process.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        port = free_port()
        print(f"making a sandbox world of {SAMPLES} images...", flush=True)
        make_sandbox(work / "world", samples=SAMPLES, port=port, wat_files=1)
        truth = pq.read_table(work / "world/ground_truth/images.parquet")
        url_list = work / "urls.parquet"
        pq.write_table(pa.table({"url": truth.column("url"), "caption": truth.column("caption")}), url_list)
        (work / "nginx").mkdir()
        nginx = start_nginx(work / "world/web", port, work / "nginx")

        os.environ["CLIPFLEET_STATE_DIR"] = str(work / "state")
        fleet = start_fleet(["cpu-download"], store_key=str(work), flower=False, concurrency=PROCESSES,
                            log_dir=work)
        times = {"img2dataset": [], "clipfleet": [], "floor": []}
        for attempt in range(REPEATS):  # interleaved, so a busy spell on the machine hits all three
            out = work / f"img2dataset-{attempt}"
            times["img2dataset"].append(run_img2dataset(url_list, out))
            i2d_ok = successes(out)
            store = work / f"clipfleet-{attempt}"
            times["clipfleet"].append(run_clipfleet(url_list, store, fleet))
            ours_ok = successes(store / "images")
            times["floor"].append(run_floor(work / "world/web/img"))
            shutil.rmtree(out)
            shutil.rmtree(store)
        floor_s = min(times["floor"])
    finally:
        if fleet is not None:
            fleet.stop(grace=10)
        if nginx is not None:
            stop(nginx)
        shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)

    rates = {"img2dataset_samples_per_s": SAMPLES / min(times["img2dataset"]),
             "clipfleet_samples_per_s": SAMPLES / min(times["clipfleet"]),
             "floor_samples_per_s": SAMPLES / floor_s}
    result = {**{k: round(v, 1) for k, v in rates.items()},
              "samples": SAMPLES, "processes": PROCESSES, "threads": THREADS,
              "img2dataset_successes": i2d_ok, "clipfleet_successes": ours_ok,
              "ratio_clipfleet_over_img2dataset": round(rates["clipfleet_samples_per_s"] / rates["img2dataset_samples_per_s"], 2),
              "ratio_floor_over_clipfleet": round(rates["floor_samples_per_s"] / rates["clipfleet_samples_per_s"], 2)}
    print(f"{SAMPLES} images from nginx on 127.0.0.1, {PROCESSES} processes x {THREADS} threads, "
          f"256 px border jpg q95, best of {REPEATS}")
    print(f"  {'img2dataset 1.47':<34}{rates['img2dataset_samples_per_s']:>8.0f} samples/s  ({i2d_ok} ok)")
    print(f"  {'clipfleet download (fleet)':<34}{rates['clipfleet_samples_per_s']:>8.0f} samples/s  ({ours_ok} ok)")
    print(f"  {'floor: decode-resize-encode loop':<34}{rates['floor_samples_per_s']:>8.0f} samples/s")
    print(f"  clipfleet / img2dataset = {result['ratio_clipfleet_over_img2dataset']:.2f}x  (goal >= 2)")
    print(f"  floor / clipfleet       = {result['ratio_floor_over_clipfleet']:.2f}x  (goal <= 1.25)")
    return result


if __name__ == "__main__":
    main()
