"""`clipfleet metrics`: queue lengths for Prometheus, counting what Flower does not.

With late acks a running task is not in its queue's list any more but in kombu's `unacked`
hash until it finishes, so a queue's waiting count alone reads "idle" while every worker is busy.
Autoscalers (KEDA) and alerts need waiting + reserved, so both are exported per queue:

  clipfleet_queue_waiting{queue}    messages in the queue's list (not yet delivered)
  clipfleet_queue_reserved{queue}   delivered, not yet acked (running or prefetched)
  clipfleet_queue_load{queue}       waiting + reserved: what a scaler should scale on
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app

from clipfleet.shared.stages import REGISTRY
from clipfleet.workers import registry as _stages  # noqa: F401  (fills REGISTRY)

log = logging.getLogger("clipfleet.metrics")

UNACKED_KEY = "unacked"  # kombu's Redis transport: delivery tag -> [message, exchange, routing key]


def queue_counts(client) -> dict[str, tuple[int, int]]:
    """(waiting, reserved) per queue, read from the broker's Redis."""
    reserved = Counter()
    for raw in client.hvals(UNACKED_KEY):
        try:
            routing_key = json.loads(raw)[2]
        except (ValueError, IndexError, TypeError):
            continue  # not a kombu record: not ours to count
        reserved[routing_key] += 1
    pipe = client.pipeline()
    for queue in REGISTRY.queue_names():
        pipe.llen(queue)
    waiting = pipe.execute()
    return {q: (int(w), reserved[q]) for q, w in zip(REGISTRY.queue_names(), waiting)}


class QueueMetrics:
    def __init__(self, client, registry: CollectorRegistry | None = None):
        self.client = client
        self.registry = registry or CollectorRegistry()
        self.waiting = Gauge("clipfleet_queue_waiting", "messages waiting in the queue", ["queue"],
                             registry=self.registry)
        self.reserved = Gauge("clipfleet_queue_reserved", "messages delivered and not yet acked "
                              "(running or prefetched)", ["queue"], registry=self.registry)
        self.load = Gauge("clipfleet_queue_load", "waiting + reserved", ["queue"], registry=self.registry)
        self.up = Gauge("clipfleet_broker_up", "1 when the broker answered the last read", registry=self.registry)

    def refresh(self) -> None:
        try:
            counts = queue_counts(self.client)
        except Exception as exc:  # the broker being away is itself what to report
            log.warning("broker unreachable: %s", exc)
            self.up.set(0)
            return
        self.up.set(1)
        for queue, (waiting, reserved) in counts.items():
            self.waiting.labels(queue).set(waiting)
            self.reserved.labels(queue).set(reserved)
            self.load.labels(queue).set(waiting + reserved)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def serve(broker: str, host: str = "127.0.0.1", port: int = 9808, interval_s: float = 5.0,
          stop: threading.Event | None = None) -> None:
    """Refresh every `interval_s` and serve /metrics until `stop` is set."""
    import redis
    metrics = QueueMetrics(redis.Redis.from_url(broker, socket_timeout=5, socket_connect_timeout=5))
    metrics.refresh()
    server = make_server(host, port, make_wsgi_app(metrics.registry), handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(f"queue metrics: http://{host}:{server.server_port}/metrics", flush=True)
    stop = stop or threading.Event()
    try:
        while not stop.wait(interval_s):
            metrics.refresh()
    finally:
        server.shutdown()
        server.server_close()
