"""How long a SIGKILLed node's shards take to come back, with the default recovery settings.

    .venv/bin/python -m bench.recovery

A sandbox web whose slow drips hold each shard for ~8 s, an external redis-server, one
`clipfleet worker` node (2 processes) and `clipfleet run --urls ... --broker ...`. Once the node
holds two shards it is SIGKILLed (whole process group) and a fresh node starts at once. Prints
the seconds from the kill until the run's sweeper put the shards back, and until they were
done, beside the bound the README states (lease + suspect + sweep) and Redis's visibility
timeout, which is what the fleet waited for before. A measurement, not a test.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from clipfleet.producer.fleet import check_broker, find_redis_server, free_port
from clipfleet.shared.recovery import recovery_bound_s
from clipfleet.sandbox.server import SandboxServer
from clipfleet.sandbox.web import make_sandbox
from clipfleet.shared.storage import Store

CLI = [sys.executable, "-m", "clipfleet.producer.cli"]
SHARDS, GOOD, SLOW, TIMEOUT_S = 4, 4, 4, 2


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="clipfleet-recovery-bench-"))
    make_sandbox(tmp / "world", samples=20, port=free_port(), seed=1, wat_files=1)
    web = SandboxServer(tmp / "world").start()
    drips = [SandboxServer(tmp / "world", host=f"127.0.0.{k}", port=0).start() for k in range(2, 2 + SHARDS * SLOW)]
    port = free_port()
    (tmp / "redis").mkdir()
    redis_proc = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir",
                                   str(tmp / "redis"), "--appendonly", "yes", "--save", ""],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    broker = f"redis://127.0.0.1:{port}/0"
    procs = []
    try:
        for _ in range(50):
            try:
                check_broker(broker, 0.5)
                break
            except Exception:
                time.sleep(0.2)
        images = pq.read_table(tmp / "world/ground_truth/images.parquet").column("url").to_pylist()
        hosts = iter(d.url for d in drips)
        rows = [u for s in range(SHARDS) for u in images[s * GOOD:(s + 1) * GOOD] +
                [f"{next(hosts)}/corner/slow-drip.jpg" for _ in range(SLOW)]]
        pq.write_table(pa.table({"url": rows, "caption": ["c"] * len(rows)}), tmp / "urls.parquet")

        def worker(name):
            p = subprocess.Popen(CLI + ["worker", "--queues", "cpu-download", "--broker", broker, "--concurrency", "2"],
                                 stdout=open(tmp / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
            procs.append(p)
            return p
        node = worker("worker-0")
        run_log = tmp / "run.log"
        run = subprocess.Popen(CLI + ["run", "--urls", str(tmp / "urls.parquet"), "--store", str(tmp / "store"),
                                      "--broker", broker, "--until", "download", "--allow-private-addresses",
                                      "--shard-size", str(GOOD + SLOW), "--download-timeout", str(TIMEOUT_S),
                                      "--download-threads", "1", "--download-retries", "0", "--domain-max-rate", "0",
                                      "--domain-max-concurrency", "64"],
                               stdout=open(run_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(run)
        client = redis.Redis.from_url(broker)
        while not sum(1 for _, t in client.zrange("unacked_index", 0, -1, withscores=True) if time.time() - t > 1) >= 2:
            time.sleep(0.1)
        store = Store(str(tmp / "store"))
        held = {f"{s:05d}" for s in range(SHARDS)} - store.done("download")
        os.killpg(node.pid, signal.SIGKILL)
        killed = time.time()
        worker("worker-1")
        run.wait(600)
        log = run_log.read_text()
        restored = [time.mktime(time.strptime(m.split(",")[0], "%Y-%m-%d %H:%M:%S")) + int(m.split(",")[1]) / 1000
                    for m in re.findall(r"^(\S+ \S+) WARNING clipfleet.recovery: download \d+: held by no live worker",
                                        log, re.M)]
        done_at = max(store.marker("download", n)["finished_at"] for n in held)
        print(json.dumps({
            "run_exit_code": run.returncode, "shards_not_done_at_the_kill": len(held),
            "seconds_kill_to_requeue": round(max(restored) - killed, 1) if restored else None,
            "seconds_kill_to_done": round(done_at - killed, 1),
            "stated_bound_s": recovery_bound_s(),
            "visibility_timeout_s_before": int(os.environ.get("CLIPFLEET_VISIBILITY_TIMEOUT", 3600)),
        }, indent=1))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        redis_proc.terminate()
        redis_proc.wait()
        web.stop()
        for d in drips:
            d.stop()


if __name__ == "__main__":
    main()
