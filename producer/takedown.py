"""`clipfleet takedown`: remove samples from a published run (see workers/index/takedown.py)."""
from __future__ import annotations

import sys
from pathlib import Path

from clipfleet.workers.download.blocklist import Blocklist, read_lines


def perceptual_list(source: str) -> Blocklist:
    """--phashes FILE: `phash:<16 hex>[/<distance>]` lines, or paths of images (relative to the
    file's folder), each hashed as download hashes a picture and listed with the default distance."""
    from clipfleet.workers.download.phash import phash_bytes
    from clipfleet.workers.download.options import PHASH_DISTANCE
    lines = []
    for line in read_lines(source):
        line = line.strip()
        image = Path(source).parent / line
        if line and not line.startswith(("#", "phash:")) and image.is_file():
            line = f"phash:{phash_bytes(image.read_bytes())}/{PHASH_DISTANCE}"
        lines.append(line)
    wanted = Blocklist.parse(lines, source=source)
    if wanted.urls or wanted.md5 or wanted.sha256:
        raise ValueError(f"{source} holds URLs or md5/sha256 hashes; pass it with --urls or --hashes")
    return wanted


def run_takedown(store_uri: str, urls: str | None, hashes: str | None, reason: str,
                 phashes: str | None = None) -> int:
    from tqdm import tqdm
    from clipfleet.shared.storage import Store
    from clipfleet.workers.index.takedown import load_list, takedown
    store = Store(store_uri)
    if not store.exists("run.json"):
        raise ValueError(f"{store_uri} holds no run (no run.json)")
    source = urls or hashes or phashes
    wanted = perceptual_list(source) if phashes else load_list(source)
    if urls and (wanted.md5 or wanted.sha256 or wanted.phash):
        raise ValueError(f"{source} holds hashes; pass it with --hashes or --phashes")
    if hashes and (wanted.urls or wanted.phash):
        raise ValueError(f"{source} holds URLs or perceptual hashes; pass it with --urls or --phashes")
    result = takedown(store, wanted, reason, source,
                      progress=lambda shards: tqdm(shards, desc="shards", unit="shard", disable=not sys.stderr.isatty()))
    print(f"removed {len(result.removed)} samples ({result.already} already removed before)")
    missing = result.not_found["urls"] + result.not_found["hashes"]
    if missing:
        print(f"{len(missing)} entries matched no sample of this run (blocklisted all the same)")
    print(f"record: {store.url(result.record)}")
    from clipfleet.workers.publish.card import write_card
    card = write_card(store)  # its counts and takedowns changed
    if card:
        print(f"dataset card: {card}")
    for uri in result.blocklists:
        print(f"blocklist: {uri}")
    print("later runs: pass --blocklist " + result.blocklists[-1] + " so they never store these")
    return 0
