"""`clipfleet plan`: the arithmetic from samples wanted back to workers, storage, Redis and
bandwidth; figures taken from `make bench`'s results or a run's markers, each with its source."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from clipfleet.shared.runstate import totals
from clipfleet.producer.plan import DEFAULTS, Figure, from_bench, make_plan
from clipfleet.shared import layout
from clipfleet.shared.storage import Store

SECONDS = 7 * 86400


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipfleet.producer.cli", "plan", *args],
                          capture_output=True, text=True, timeout=300)


def test_laion_5b_plan_works_back_from_the_published_samples():
    plan = make_plan(5.85e9, 7)
    rows = plan.rows
    # 5.85 B published at LAION's rates: 50 B candidates, 70% downloaded, the rest judged by CLIP.
    assert rows["cpu-extract"]["work"] == pytest.approx(50e9)
    assert rows["gpu-clip"]["work"] == pytest.approx(35e9)
    assert rows["gpu-embed"]["work"] == 5.85e9
    util = DEFAULTS["utilisation"].value
    assert rows["gpu-embed"]["workers"] == math.ceil(32 / util)  # LAION's 32 A100s, at 70% busy
    assert rows["cpu-download"]["workers"] == math.ceil(50e9 / SECONDS / (650 * util))
    assert plan.storage["embeddings/ (image + text, float16)"] == 5.85e9 * 768 * 2 * 2
    assert plan.redis["dedup claims"] == pytest.approx(50e9 * DEFAULTS["dedup_bytes_per_url"].value)
    assert plan.redis["dedup claims"] <= 50e9 * 10  # the claim layout's measured <= 10 B a URL
    assert plan.bandwidth["images in"] == pytest.approx(50e9 * 0.7 / SECONDS * 120_000)
    assert any("exceed one 64 GB Redis node" in n and "--dedup-redis" in n for n in plan.notes)
    # every assumption is stated with where it came from
    assert all(f.source for f in plan.figures.values())


def test_more_samples_or_fewer_days_scale_the_fleet():
    base = make_plan(1e9, 10)
    double = make_plan(2e9, 10)
    hurried = make_plan(1e9, 5)
    for queue in ("cpu-download", "gpu-clip", "gpu-embed"):
        assert double.rows[queue]["workers"] == pytest.approx(2 * base.rows[queue]["workers"], abs=1)
        assert hurried.rows[queue]["workers"] == pytest.approx(2 * base.rows[queue]["workers"], abs=1)
    assert double.storage["index/ (image + text)"] == 2 * base.storage["index/ (image + text)"]
    assert hurried.storage == base.storage  # time changes the fleet, not what it stores


def test_image_size_scales_image_storage():
    small, large = make_plan(1e9, 7, image_size=256), make_plan(1e9, 7, image_size=512)
    key = "images/ (every downloaded image)"
    assert large.storage[key] == pytest.approx(4 * small.storage[key])


def test_figures_from_bench_results(tmp_path):
    results = {
        "bench.extract": {"wat_records": 30000, "clipfleet_records_per_s": 12000, "clipfleet_pairs_kept": 120000},
        "bench.download": {"clipfleet_samples_per_s": 1300.0, "processes": 2, "threads": 64},
        "bench.tag": {"l14_stage_tags_per_s_per_core": 40000},
        "scale": {"dedup": {"bytes_per_url": 8.5, "urls": 10_000_000, "redis_version": "6.2.14"}},
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    figures = from_bench(str(path))
    assert figures["extract_pairs_per_s"].value == 12000 * 4
    assert figures["download_cpu_per_s"].value == 650
    assert figures["tag_per_s"].value == 40000
    assert figures["dedup_bytes_per_url"].value == 8.5
    assert all(str(path) in f.source for f in figures.values())
    proc = cli("--samples", "1e8", "--days", "2", "--from-bench", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["queues"]["cpu-extract"]["per_worker_per_s"] == 48000
    assert plan["assumptions"]["download_cpu_per_s"]["source"].startswith(str(path))
    assert plan["redis_bytes"]["dedup claims"] == pytest.approx(plan["queues"]["cpu-extract"]["work"] * 8.5)


def test_plan_uses_the_measured_dedup_figure(tmp_path):
    """bench.scale's figure alone is enough for --from-bench, and it is what the plan sizes Redis by."""
    import bench.scale
    path = tmp_path / "results.json"
    bench.scale.write_results("dedup", {"bytes_per_url": 7.9, "urls": 10_000_000}, path)
    bench.scale.write_results("other", {"x": 1}, path)  # a second part keeps the first
    assert json.loads(path.read_text())["scale"]["dedup"]["bytes_per_url"] == 7.9
    plan = json.loads(cli("--samples", "5.85e9", "--days", "7", "--from-bench", str(path), "--json").stdout)
    assert plan["redis_bytes"]["dedup claims"] == pytest.approx(50e9 * 7.9)
    assert "10,000,000 claims" in plan["assumptions"]["dedup_bytes_per_url"]["source"]


@pytest.mark.parametrize("content, message", [("not json", "cannot read bench results"),
                                              ('{"bench.x": {"y": 1}}', "holds no throughput")])
def test_bad_bench_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_text(content)
    proc = cli("--samples", "1e6", "--days", "1", "--from-bench", str(path))
    assert proc.returncode == 2 and message in proc.stderr


def test_bad_numbers_are_clear_errors():
    proc = cli("--samples", "0", "--days", "1")
    assert proc.returncode == 2 and "must be positive" in proc.stderr


def test_figures_from_a_runs_markers(built_run):
    directory, info = built_run
    store = Store(str(directory))
    download, clip = totals(m["stats"] for m in store.markers("download")), totals(m["stats"] for m in store.markers("clip"))
    proc = cli("--samples", "1e9", "--days", "7", "--store", str(directory), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    figures = plan["assumptions"]
    assert figures["success_rate"]["value"] == pytest.approx(download["success"] / download["count"])
    assert figures["keep_rate"]["value"] == pytest.approx(clip["kept"] / clip["samples"])
    tar_bytes = sum((directory / layout.image_shard(s)).stat().st_size for s in info["shards"])
    assert figures["bytes_per_image"]["value"] == pytest.approx(tar_bytes / download["success"])
    assert figures["embed_dim"]["value"] == 128  # the shapes model's
    assert figures["fetch_latency_s"]["value"] is None  # the markers' rate already waited on the network
    work_s = sum(m["duration_s"] for m in store.markers("download"))
    assert figures["download_cpu_per_s"]["value"] == pytest.approx(download["count"] / work_s)
    assert str(directory) in figures["success_rate"]["source"]
    # The CLIP filter ran on CPU here: its rate is no GPU's, so the GPU default stays, and says so.
    assert figures["clip_gpu_per_s"]["value"] == DEFAULTS["clip_gpu_per_s"].value
    assert any("clip ran on CPU" in n for n in plan["notes"]) or "cuda" in figures["clip_gpu_per_s"]["source"]
    downloaded = 1e9 / figures["keep_rate"]["value"]
    assert plan["queues"]["gpu-clip"]["work"] == pytest.approx(downloaded)
    assert plan["queues"]["cpu-download"]["work"] == pytest.approx(downloaded / figures["success_rate"]["value"])


def test_politeness_memory_per_host_is_what_redis_uses(redis_url):
    """The plan's bytes per host in Redis, measured again on a real redis-server."""
    import redis

    from clipfleet.workers.download.politeness import OK, DomainLimiter, DomainLimits
    client = redis.Redis.from_url(redis_url)
    limiter = DomainLimiter(client, DomainLimits())
    before = client.info("memory")["used_memory"]
    hosts = 3000
    for i in range(hosts):
        host = f"img{i}.example-{i % 97}.org"
        limiter.release(host, limiter.acquire(host), OK, 0.05)
    limiter.flush()
    per_host = (client.info("memory")["used_memory"] - before) / hosts
    assert client.dbsize() == hosts  # one hash per host once its requests are done
    assert per_host == pytest.approx(DEFAULTS["politeness_bytes_per_host"].value, rel=0.35)


def test_plan_prints_every_assumption():
    proc = cli("--samples", "5.85e9", "--days", "7")
    assert proc.returncode == 0, proc.stderr
    for name in DEFAULTS:
        assert f"  {name} = " in proc.stdout
    assert "GPUs:" in proc.stdout and "dedup claims" in proc.stdout and "Gbit/s" in proc.stdout
    assert isinstance(DEFAULTS["keep_rate"], Figure)


def test_image_size_flag_sizes_the_images():
    plans = [json.loads(cli("--samples", "1e9", "--days", "7", "--json", *extra).stdout)
             for extra in ((), ("--image-size", "512"))]
    key = "images/ (every downloaded image)"
    assert plans[1]["storage_bytes"][key] == pytest.approx(4 * plans[0]["storage_bytes"][key])
