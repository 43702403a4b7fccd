"""`clipfleet status`: per stage, shards expected / done / in flight / queued / recovered / dead,
samples and samples/s, and every count the markers hold (nested groups included).

With a broker (`--broker` or $CLIPFLEET_BROKER) it also looks at what the fleet holds, and
recovers shards nobody holds (shared/recovery.py), as a following `clipfleet run` would:
that is how a `--detach`ed run is looked after.
"""
from __future__ import annotations

import json
import os
import time

from clipfleet.shared.layout import RUN_FILE
from clipfleet.shared.recovery import recovered_counts
from clipfleet.shared.runindex import RunIndex
from clipfleet.shared.runstate import RunState
from clipfleet.shared.storage import Store


def collect(store: Store, broker: str | None = None, recover: bool = True, rebuild: bool = False) -> dict:
    """What `status` shows. With a broker, counts come from the run state it keeps (O(stages));
    without, from the markers (each read once, kept in per-stage summaries)."""
    run = RunState(store)
    cfg = run.cfg
    if broker:
        import redis
        run.index = RunIndex(redis.Redis.from_url(broker, socket_timeout=30, socket_connect_timeout=5),
                             store.uri, cfg.created_at)
        if rebuild:
            run.rebuild_index()
    elif rebuild:
        run.unseal()
    state = run.all()
    if run.index is None:
        run.seal(state)  # complete: a later look reads the summaries without listing
    info = {"store": store.uri, "until": cfg.until, "input_kind": cfg.input_kind,
            "inputs": len(cfg.inputs), "broker": None, "stages": {}}
    holdings, sweeper = {}, None
    if broker:
        holdings, sweeper = _look_at_broker(run, state, broker, recover)
        info["broker"] = {"url": _redacted(broker), "recover": recover}
    sealed = run.sealed_counts()
    for p in state:
        # a sealed run says how many shards failed and were recovered: nothing listed when none
        dead = store.deadletters(p.stage) if sealed is None or p.n_failed else []
        recovered = recovered_counts(store, p.stage) if sealed is None else {"all": sealed.get(p.stage, 0)}
        h = holdings.get(p.stage)
        wall = p.wall_s
        entry = {
            "expected": p.n_expected, "done": p.n_done, "failed": p.n_failed,
            "dead": len(dead),
            "in_flight": None if h is None else len(h.in_flight),
            "queued": None if h is None else len(h.queued),
            # The store's records include what this command recovered just now.
            "recovered": max(sum(recovered.values()), sweeper.recovered[p.stage] if sweeper else 0),
            "samples_expected": p.samples_expected, "samples_done": p.samples_done,
            "samples_out": p.samples_out,
            # reported by running shards whose stage calls stats.advance
            "samples_running": None if h is None else sum(v for k, v in h.progress.items() if k in h.in_flight),
            "samples_per_s": round(p.samples_done / wall, 1) if wall > 0 else None,
            "duration_s": round(p.work_s, 1),
            "totals": p.totals,
            "failures": [{"shard": d["shard"], "error": d.get("error")} for d in dead],
        }
        if h is not None:
            entry["in_flight_shards"] = sorted(h.in_flight)
        info["stages"][p.stage] = entry
    return info


def _redacted(url: str) -> str:
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def _look_at_broker(run: RunState, state, broker: str, recover: bool):
    """(holdings per stage, sweeper). With `recover`, shards unheld now are looked at again
    after the suspect time, and sent again if still nobody holds them."""
    import redis
    from clipfleet.shared import leases
    from clipfleet.shared.recovery import Sweeper, done, pending
    from clipfleet.workers.app import make_app
    app, client = make_app(broker), redis.Redis.from_url(broker, socket_timeout=10, socket_connect_timeout=5)
    sweeper = Sweeper(app, client, run.store, task_kwargs=run.task_kwargs)
    holdings = sweeper.sweep(pending(state), done(state))
    if recover and any(h.unheld for h in holdings.values()):
        time.sleep(leases.suspect_s() + 0.5)
        holdings = sweeper.sweep(pending(state), done(state))
    elif not recover:
        sweeper.suspects.clear()
    return holdings, sweeper


def run_status(store_uri: str, as_json: bool = False, broker: str | None = None, recover: bool = True,
               rebuild: bool = False) -> int:
    store = Store(store_uri)
    if not store.exists(RUN_FILE):
        print(f"clipfleet: error: {store_uri} holds no run (no run.json)")
        return 2
    broker = broker or os.environ.get("CLIPFLEET_BROKER")
    info = collect(store, broker, recover, rebuild)
    if as_json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"store: {info['store']} (until {info['until']}, {info['inputs']} {info['input_kind']} inputs)")
    if not broker:
        print("(no --broker: in flight and queued unknown, nothing recovered)")
    for stage, s in info["stages"].items():
        held = ("" if s["in_flight"] is None else f", {s['in_flight']} in flight, {s['queued']} queued")
        line = (f"{stage:>9}: {s['done']}/{s['expected']} shards done{held}, {s['recovered']} recovered, "
                f"{s['dead']} dead")
        print(line)
        samples = f"{s['samples_done']}" + (f"/{s['samples_expected']}" if s["samples_expected"] is not None else "")
        rate = f", {s['samples_per_s']} samples/s" if s["samples_per_s"] else ""
        if s["samples_running"]:
            rate += f", {s['samples_running']} more in running shards"
        out = f", {s['samples_out']} out" if s["samples_out"] is not None else ""
        print(f"{'':>11}samples: {samples} in{out}{rate}; {s['duration_s']}s of work")
        for key, value in s["totals"].items():
            if isinstance(value, dict) and value and all(_is_number(k) for k in value):
                # a histogram (bin -> count, e.g. embed's near_dup_copy_bits): one line, bins in order
                bins = sorted(value.items(), key=lambda kv: float(kv[0]))
                print(f"{'':>11}{key}: " + ", ".join(f"{k}: {v}" for k, v in bins))
            elif isinstance(value, dict):
                print(f"{'':>11}{key}:")
                for k, v in value.items():
                    print(f"{'':>13}{k}: {v}")
            else:
                print(f"{'':>11}{key}: {value}")
        for f in s["failures"]:
            print(f"{'':>11}dead shard {f['shard']}: {f['error']}")
    return 0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
