"""Shard leases in Redis: which worker holds which shard, renewed while it holds it.

Celery on Redis hands a dead worker's unacked tasks back only after the visibility timeout
(an hour by default), and some failures ack a task whose shard never finished. So every worker
keeps a lease per shard it holds (reserved, waiting for its ETA, or running), renewed by a
heartbeat thread in the worker's main process; a sweeper (shared/recovery.py) re-sends a
shard that is expected, not done, not dead-lettered, not queued and not leased.

Timing (seconds, from the environment so tests can shrink them):
  CLIPFLEET_LEASE_S      lease lifetime (default 20): survives three missed renewals
  heartbeat              every lease_s / 4
  CLIPFLEET_SUSPECT_S    how long a shard must stay unheld before it is re-sent (default 10):
                         two heartbeats, so a holder whose leases vanished with a Redis restart
                         renews them first
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time

log = logging.getLogger("clipfleet.leases")

PREFIX = "clipfleet:lease"


def lease_s() -> float:
    return float(os.environ.get("CLIPFLEET_LEASE_S", 20))


def heartbeat_s() -> float:
    return lease_s() / 4


def suspect_s() -> float:
    return float(os.environ.get("CLIPFLEET_SUSPECT_S", 10))


def run_key(store_uri: str) -> str:
    """A short stable id for a run's store, for Redis key names."""
    return hashlib.sha1(store_uri.rstrip("/").encode()).hexdigest()[:12]


def lease_key(store_uri: str, stage: str, shard) -> str:
    return f"{PREFIX}:{run_key(store_uri)}:{stage}:{int(shard)}"


def progress_key(store_uri: str, stage: str, shard) -> str:
    """Samples a running shard has handled so far (shared/pipeline.Stats.advance)."""
    return f"clipfleet:progress:{run_key(store_uri)}:{stage}:{int(shard)}"


def read_progress(client, store_uri: str, stage: str, shards) -> dict[int, int]:
    shards = sorted(shards)
    if not shards:
        return {}
    values = client.mget([progress_key(store_uri, stage, s) for s in shards])
    return {s: int(v) for s, v in zip(shards, values) if v is not None}


def shard_of_task(name: str, args, kwargs) -> tuple[str, str, int] | None:
    """(store_uri, stage, shard) of a shard task's call, or None for anything else."""
    if not name.startswith("clipfleet.") or name.startswith("clipfleet.selfcheck."):
        return None
    args = list(args or [])
    kwargs = kwargs or {}
    store_uri = args[0] if args else kwargs.get("store_uri")
    shard = args[1] if len(args) > 1 else kwargs.get("shard")
    if not isinstance(store_uri, str) or not isinstance(shard, int):
        return None
    return store_uri, name.removeprefix("clipfleet."), shard


def read_leases(client, store_uri: str, stage: str, shards: list[int]) -> dict[int, dict]:
    """The live leases among `shards`: shard -> what its holder wrote."""
    if not shards:
        return {}
    values = client.mget([lease_key(store_uri, stage, s) for s in shards])
    return {shard: decode(value) for shard, value in zip(shards, values) if value is not None}


def decode(value) -> dict:
    """A lease's value: the holder's id, a newline, then JSON about it."""
    value = value.decode() if isinstance(value, bytes) else value
    holder, _, rest = value.partition("\n")
    try:
        info = json.loads(rest) if rest else {}
    except ValueError:
        info = {}
    return {**info, "worker": holder}


# Delete a lease only while it is still ours: a shard re-sent elsewhere has another holder.
_RELEASE = """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Heartbeat:
    """Renews a lease for every shard this worker holds, from a thread of its main process.

    `holdings()` returns {(store_uri, stage, shard): state} as the worker sees it now. A lease
    dropped from the holdings is deleted at once, so a finished or rejected shard does not look
    held for a whole lease lifetime. Redis errors are logged and retried on the next beat:
    the leases then lapse, which is what the sweeper is for."""

    def __init__(self, client_factory, holdings, worker: str | None = None):
        self._client_factory = client_factory
        self._holdings = holdings
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held: set[str] = set()
        self._client = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="clipfleet-lease-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def beat(self) -> None:
        if self._client is None:
            self._client = self._client_factory()
        now = time.time()
        ttl_ms = int(lease_s() * 1000)
        current = {}
        for (store_uri, stage, shard), state in self._holdings().items():
            current[lease_key(store_uri, stage, shard)] = self.worker + "\n" + json.dumps(
                {"pid": os.getpid(), "state": state, "renewed_at": now})
        pipe = self._client.pipeline(transaction=False)
        for key, value in current.items():
            pipe.set(key, value, px=ttl_ms)
        for key in self._held - set(current):
            pipe.eval(_RELEASE, 1, key, self.worker + "\n")
        pipe.execute()
        self._held = set(current)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # Redis away: leases lapse, the sweeper's bound covers it
                log.warning("lease heartbeat failed (%s: %s); retrying", exc.__class__.__name__, exc)
                self._client = None
            self._stop.wait(heartbeat_s())
