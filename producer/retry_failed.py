"""`clipfleet retry-failed --store S`: fetch again only the URLs that failed for a transient reason.

For every finished download shard (not itself a retry), the rows of images/{shard}.parquet that
failed to download for a transient reason (shared/retries.py: timeouts, 5xx, 429, DNS, connection
errors) become a new URL shard, urls/{RETRY_OFFSET + shard}.parquet, with the original rows'
columns. Those shards are then run like any run's first tasks: download, then every later stage
up to the run's --until, on an embedded fleet or --broker's. Good shards are never rewritten;
refusals (robots.txt rules, opt-outs, blocklists) and permanent failures (404, undecodable) are
never retried; a shard already retried is skipped, so a second run fetches nothing new.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipfleet.shared import layout
from clipfleet.shared.retries import is_retry, retry_shard, transient
from clipfleet.shared.storage import Store

log = logging.getLogger("clipfleet")


@dataclass
class Planned:
    shard: int        # the finished shard
    retry: int        # the new shard
    urls: int         # URLs in it


def _read(store: Store, rel: str) -> pa.Table:
    return pq.read_table(io.BytesIO(store.read_bytes(rel)))


def plan(store: Store) -> tuple[list[Planned], int]:
    """Write the URL shard of every download shard with transient failures not retried yet.
    Returns (the new shards, how many shards were retried before)."""
    planned, before = [], 0
    for name in sorted(store.done("download")):
        shard = int(name)
        if is_retry(shard):
            continue
        retry = retry_shard(shard)
        if store.exists(layout.url_shard(retry)):
            before += 1
            continue
        images = _read(store, layout.image_shard(shard, "parquet"))
        failed = [i for i, (status, message) in enumerate(zip(images.column("status").to_pylist(),
                                                               images.column("error_message").to_pylist()))
                  if status == "failed_to_download" and transient(message)]
        if not failed:
            continue
        urls = _read(store, layout.url_shard(shard))
        # the images table holds the URL shard's rows in order, plus the stage's own columns
        if images.column("url").to_pylist() != urls.column("url").to_pylist():
            raise RuntimeError(f"images/{name}.parquet does not follow urls/{name}.parquet row for row")
        table = urls.take(pa.array(failed, pa.int64()))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        store.write_bytes(layout.url_shard(retry), buf.getvalue())
        planned.append(Planned(shard, retry, len(failed)))
    return planned, before


def retried_counts(store: Store) -> dict[str, int]:
    """Over the retry shards done so far: URLs retried, and how many of them are now stored."""
    out = {"retried": 0, "recovered": 0}
    for name in store.done("download"):
        if is_retry(int(name)):
            images = _read(store, layout.image_shard(int(name), "parquet"))
            out["retried"] += len(images)
            out["recovered"] += int(pc.sum(pc.equal(images.column("status"), "success")).as_py() or 0)
    return out


def run_retry_failed(store_uri: str, broker: str | None = None) -> int:
    from clipfleet.producer.fleet import start_fleet, state_dir
    from clipfleet.producer.follow import run_with_fleet
    from clipfleet.producer.register import FirstTask, RunError, check_store
    from clipfleet.shared.runconfig import RunConfig
    from clipfleet.shared.runstate import RunState
    from clipfleet.shared.stages import REGISTRY
    store = check_store(store_uri)
    if not store.exists(layout.RUN_FILE):
        raise RunError(f"{store.uri} holds no run (no run.json)")
    cfg = RunConfig.load(store)
    RunState(store, cfg).unseal()  # new shards join the run: the next look lists the markers
    planned, before = plan(store)
    if not planned:
        print(f"nothing to retry: no finished download shard has a transient failure left to retry "
              f"({before} shards retried before)")
        return 0
    print(f"retrying {sum(p.urls for p in planned)} URLs of {len(planned)} shards in new shards "
          f"{', '.join(str(p.retry) for p in planned[:5])}{' ...' if len(planned) > 5 else ''}")
    reader = REGISTRY.first("urls")
    first = [FirstTask(reader, p.retry, {}) for p in planned]
    stages = cfg.stages[cfg.stages.index(reader):]
    fleet, settled = None, False
    try:
        if broker is None:
            logs = state_dir(store.uri) / "logs"
            logs.mkdir(exist_ok=True)
            # Not waited for, as in `run`: the tasks wait in their queues while the workers come up.
            fleet = start_fleet([REGISTRY[s].queue for s in stages], store_key=store.uri, flower=False,
                                log_dir=logs, wait_for_workers=False)
            broker = fleet.broker
        code = run_with_fleet(RunState(store, cfg), first, broker, fleet=fleet)
        settled = True
    finally:
        if fleet is not None:
            fleet.stop_idle() if settled else fleet.stop()
    counted = retried_counts(store)
    print(f"retried {counted['retried']} URLs in all, {counted['recovered']} of them now stored")
    return code
