"""`clipfleet takedown`: remove samples from a published run (see workers/index/takedown.py)."""
from __future__ import annotations

import sys


def run_takedown(store_uri: str, urls: str | None, hashes: str | None, reason: str) -> int:
    from tqdm import tqdm
    from clipfleet.shared.storage import Store
    from clipfleet.workers.index.takedown import load_list, takedown
    store = Store(store_uri)
    if not store.exists("run.json"):
        raise ValueError(f"{store_uri} holds no run (no run.json)")
    source = urls or hashes
    wanted = load_list(source)
    if urls and (wanted.md5 or wanted.sha256):
        raise ValueError(f"{source} holds hashes; pass it with --hashes")
    if hashes and wanted.urls:
        raise ValueError(f"{source} holds URLs; pass it with --urls")
    result = takedown(store, wanted, reason, source,
                      progress=lambda shards: tqdm(shards, desc="shards", unit="shard", disable=not sys.stderr.isatty()))
    print(f"removed {len(result.removed)} samples ({result.already} already removed before)")
    missing = result.not_found["urls"] + result.not_found["hashes"]
    if missing:
        print(f"{len(missing)} entries matched no sample of this run (blocklisted all the same)")
    print(f"record: {store.url(result.record)}")
    from clipfleet.producer.card import write_card
    card = write_card(store)  # its counts and takedowns changed
    if card:
        print(f"dataset card: {card}")
    for uri in result.blocklists:
        print(f"blocklist: {uri}")
    print("later runs: pass --blocklist " + result.blocklists[-1] + " so they never store these")
    return 0
