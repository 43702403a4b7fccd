"""Fleet self-check: a no-op shard task on every queue that hands its shard to the next queue.

Each hop checks it was delivered on the queue it belongs to and writes a marker through the
same store commit as real stages, so a chain through all six queues shows routing, workers,
storage and redelivery work together without any model or data. The marker also names the
stage modules and the heavy libraries its process has loaded, so a test can see that a worker
imports only the stages of its queues (a download worker never loads torch).
"""
from __future__ import annotations

import os
import sys
import time

from clipfleet.workers.app import ShardTask, app
from clipfleet.shared.stages import REGISTRY
from clipfleet.shared.storage import Store

HOPS = REGISTRY.queue_names()
HEAVY_MODULES = ("torch", "open_clip", "faiss", "transformers")


def loaded_modules() -> list[str]:
    """The stage packages' modules and the heavy libraries imported in this process."""
    return sorted(name for name in sys.modules
                  if name in HEAVY_MODULES or (name.startswith("clipfleet.workers.") and name.count(".") == 3))


def _make_hop(queue: str):
    @app.task(name=f"clipfleet.selfcheck.{queue}", base=ShardTask, bind=True)
    def hop(self, store_uri: str, shard: int, hold_s: float = 0.0) -> dict:
        delivered_on = (self.request.delivery_info or {}).get("routing_key")
        if delivered_on != queue:
            raise RuntimeError(f"selfcheck hop for {queue} was delivered on {delivered_on}")
        store = Store(store_uri)
        stage = f"selfcheck-{queue}"
        if store.marker(stage, shard) is None:
            # Announce the attempt first, so a test can kill the worker while it holds the task.
            store.write_json(f"_attempts/{stage}/{shard}-{os.getpid()}.json", {"pid": os.getpid()})
            time.sleep(hold_s)
            store.commit(stage, shard, {}, {"pid": os.getpid(), "hostname": self.request.hostname,
                                            "modules": loaded_modules()})
        i = HOPS.index(queue)
        if i + 1 < len(HOPS):
            app.send_task(f"clipfleet.selfcheck.{HOPS[i + 1]}", args=(store_uri, shard))
        return {"queue": queue, "shard": shard}
    return hop


for _queue in HOPS:
    _make_hop(_queue)
