"""`clipfleet status`: shards done and failed per stage, with the counts their markers hold."""
from __future__ import annotations

import json
from collections import Counter

from clipfleet.shared.pipeline import STAGES
from clipfleet.shared.storage import Store


def collect(store: Store) -> dict:
    stages = {}
    for stage in STAGES:
        markers = store.markers(stage)
        dead = store.deadletters(stage)
        if not markers and not dead:
            continue
        totals = Counter()
        for m in markers:
            totals.update({k: v for k, v in m.get("stats", {}).items() if isinstance(v, (int, float))})
        stages[stage] = {
            "done": len(markers),
            "failed": len(dead),
            "duration_s": round(sum(m.get("duration_s", 0) for m in markers), 1),
            "totals": dict(sorted(totals.items())),
            "failures": [{"shard": d["shard"], "error": d.get("error")} for d in dead],
        }
    return {"store": store.uri, "stages": stages}


def run_status(store_uri: str, as_json: bool = False) -> int:
    store = Store(store_uri)
    if not store.exists("run.json"):
        print(f"clipfleet: error: {store_uri} holds no run (no run.json)")
        return 2
    info = collect(store)
    if as_json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"store: {info['store']}")
    for stage, s in info["stages"].items():
        print(f"{stage:>9}: {s['done']} shards done, {s['failed']} failed, {s['duration_s']}s of work")
        for key, value in s["totals"].items():
            print(f"{'':>11}{key}: {value}")
        for f in s["failures"]:
            print(f"{'':>11}failed shard {f['shard']}: {f['error']}")
    return 0
