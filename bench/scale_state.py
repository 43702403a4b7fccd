"""Run-state figures at LAION's scale: what `status`, `run`'s progress tick and one task's run-once
due checks cost at 1 000, 10 000 and 100 000 shards a stage, on a local and an S3-protocol store.

    python -m bench.scale state [--shards 1000,10000,100000] [--no-s3]

The store is a finished `--urls` run with N shards marked done through download, clip, embed and
tag (4 N markers, the URL shards listed, as the producer leaves it: per-stage summaries written
while it followed the run). Setting it up writes the objects straight into the backend (files on
disk, moto's in-process S3 backend); what is timed goes through the store as clipfleet reads it
(fsspec, the S3 protocol over HTTP to moto on loopback).
  - status: `clipfleet status` without a broker on the finished run (the store path: the sealed
    per-stage summaries, no listing); locally also the first status on a store with no summaries
    (every marker read once, the summaries written and sealed).
  - tick: one progress tick of `run` with the Redis run index (O(stages) calls); local store.
  - task: store operations of the index stage's run-once due checks (train, merge) mid-run; local
    store (the checks read Redis and one marker, on any store).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

STAGES = ("download", "clip", "embed", "tag")
SHARD_SAMPLES = 10_000


def marker(stage: str, shard: int) -> dict:
    n_in = SHARD_SAMPLES if stage == "download" else 4_000
    out = {"download": 4_000, "clip": 1_200, "embed": 1_200, "tag": 1_200}[stage]
    return {"stage": stage, "shard": shard, "outputs": [], "finished_at": 1.7e9 + shard, "host": "bench",
            "stats": {"count": n_in, "success": out, "refused": {"robots.txt": 3}},
            "samples_in": n_in, "samples_out": out, "dropped": ["refused"], "started_at": 1.7e9 + shard - 2,
            "duration_s": 2.0, "next_shards": [shard]}


def objects(n: int):
    """(relative path, bytes) of a finished --urls run of n shards."""
    from clipfleet.shared.storage import shard_name
    for shard in range(n):
        name = shard_name(shard)
        yield f"urls/{name}.parquet", b"PAR1"
        for stage in STAGES:
            yield f"_markers/{stage}/{name}.json", json.dumps(marker(stage, shard)).encode()
    yield "_state/urls.json", json.dumps({shard_name(s): SHARD_SAMPLES for s in range(n)}).encode()


def run_json(store_uri: str) -> bytes:
    import clipfleet.workers  # noqa: F401  (the stage registry)
    from clipfleet.shared.runconfig import RunConfig
    cfg = RunConfig.make(store_uri, inputs=["in.parquet"], input_kind="urls", until="tag")
    return json.dumps(cfg.to_dict()).encode()


def local_store(root: Path, n: int) -> str:
    for rel, data in [("run.json", run_json(str(root))), *objects(n)]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(root)


@contextmanager
def moto_s3():
    from moto.server import ThreadedMotoServer
    from clipfleet.producer.fleet import free_port
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ["CLIPFLEET_S3_ENDPOINT"] = f"http://127.0.0.1:{port}"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_store(endpoint: str, n: int, local: Path) -> str:
    """The same run on S3, with the per-stage summaries the local store's first status wrote
    (what `run` leaves behind; on S3 the first status would read every marker, 4 n GETs)."""
    import boto3
    from moto.backends import get_backend
    bucket = f"scale-{n}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/run"
    backend = get_backend("s3")["123456789012"]["global"]
    state = [(f"_state/{p.name}", p.read_bytes()) for p in (local / "_state").iterdir()]
    for rel, data in [("run.json", (local / "run.json").read_bytes()), *objects(n), *state]:
        backend.put_object(bucket, f"run/{rel}", data)
    return uri


class Counted:
    """Counts the store's calls that reach the backend (reads, lists, existence checks, writes)."""

    def __init__(self):
        self.n = 0

    @contextmanager
    def on(self, store):
        names = ("read_bytes", "list", "exists", "write_bytes", "open", "_put")
        real = {name: getattr(store, name) for name in names}

        def counting(fn):
            def call(*a, **k):
                self.n += 1
                return fn(*a, **k)
            return call
        for name, fn in real.items():
            setattr(store, name, counting(fn))
        try:
            yield self
        finally:
            for name, fn in real.items():
                setattr(store, name, fn)


def measure(uri: str, redis_url: str, cold: bool = True) -> dict:
    """Status always; with `cold` (the local store) also the first status, a progress tick and a
    task's store calls (both read Redis and the same few store objects on any store)."""
    import redis
    from clipfleet.producer.status import collect
    from clipfleet.shared import runstate
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.shared.runindex import RunIndex
    from clipfleet.shared.runstate import RunState
    from clipfleet.shared.storage import Store
    from clipfleet.workers.index.stage import MergeIndex, TrainIndex
    store = Store(uri)
    cfg = RunConfig.load(store)
    out = {}
    if cold:
        runstate._MARKERS.clear()
        started = time.perf_counter()
        collect(store)  # no summaries yet: every marker read once, summaries written and sealed
        out["status_first_s"] = round(time.perf_counter() - started, 2)
    runstate._MARKERS.clear()  # a new process: only the summaries remember
    started = time.perf_counter()
    info = collect(store)
    out["status_s"] = round(time.perf_counter() - started, 2)
    out["status_counted_all"] = all(info["stages"][s]["done"] == info["stages"][s]["expected"] for s in STAGES)
    if not cold:
        return out
    client = redis.Redis.from_url(redis_url)
    index = RunIndex(client, uri, cfg.created_at)
    run = RunState(store, cfg, index=index)
    run.rebuild_index()  # the index as the workers leave it, from the summaries' markers
    started = time.perf_counter()
    ticks = 20
    for _ in range(ticks):
        RunState(store, cfg, index=index).all()
    out["tick_s"] = round((time.perf_counter() - started) / ticks, 4)
    # One index task mid-run: its run-once checks (the train task is done, the merge not due)
    store.write_json("_markers/index-train/train.json", {"stats": {"index_key": "Flat", "dim": 8}})
    calls = Counted()
    for once_cls in (TrainIndex, MergeIndex):
        once = once_cls(cfg)
        once.run_index = index
        with calls.on(store):
            once.due(store)
    out["task_store_ops"] = calls.n
    client.flushall()
    return out


def main(shards: list[int] | None = None, s3: bool = True) -> dict:
    from bench.scale import _redis_server
    shards = shards or [1_000, 10_000, 100_000]
    results: dict = {}
    with _redis_server() as redis_url, tempfile.TemporaryDirectory(prefix="clipfleet-scale-") as tmp, \
            (moto_s3() if s3 else nullcontext()) as endpoint:
        for n in shards:
            local = Path(tmp) / f"store-{n}"
            results[f"local_{n}"] = measure(local_store(local, n), redis_url)
            print(f"local {n:>7} shards x {len(STAGES)} stages: {results[f'local_{n}']}", flush=True)
            if s3:
                results[f"s3_{n}"] = measure(s3_store(endpoint, n, local), redis_url, cold=False)
                print(f"s3    {n:>7} shards x {len(STAGES)} stages: {results[f's3_{n}']}", flush=True)
            shutil.rmtree(local)
    biggest = max(shards)
    ops = [v["task_store_ops"] for v in results.values() if "task_store_ops" in v]
    results["task_store_ops_constant"] = len(set(ops)) == 1
    results["status_local_s_at_max"] = results[f"local_{biggest}"]["status_s"]
    if s3:
        results["status_s3_s_at_max"] = results[f"s3_{biggest}"]["status_s"]
    return results
