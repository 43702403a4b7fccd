"""Fleet self-check: a no-op shard task on every queue that hands its shard to the next queue.

Each hop checks it was delivered on the queue it belongs to and writes a marker through the
same store commit as real stages, so a chain through all six queues shows routing, workers,
storage and redelivery work together without any model or data.
"""
from __future__ import annotations

import os
import time

from clipfleet.workers.app import ShardTask, app
from clipfleet.shared.pipeline import QUEUES
from clipfleet.shared.storage import Store

HOPS = list(QUEUES.values())


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
            store.commit(stage, shard, {}, {"pid": os.getpid(), "hostname": self.request.hostname})
        i = HOPS.index(queue)
        if i + 1 < len(HOPS):
            app.send_task(f"clipfleet.selfcheck.{HOPS[i + 1]}", args=(store_uri, shard))
        return {"queue": queue, "shard": shard}
    return hop


for _queue in HOPS:
    _make_hop(_queue)
