"""What the whole-pipeline fault tests drive: a pausable TCP proxy in front of the S3 server,
one `clipfleet worker` process per queue that a test kills and replaces, and the checks that a
finished run lost and duplicated nothing."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipfleet.producer.fleet import free_port
from clipfleet.shared import layout
from clipfleet.workers.registry import REGISTRY

QUEUES = REGISTRY.queues()
from clipfleet.shared.storage import Store, shard_name

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "clipfleet.producer.cli"]


class PausableProxy:
    """127.0.0.1:port -> 127.0.0.1:target. `pause()` makes the port unreachable (the listener
    closed, open connections reset) until `resume()` listens on the same port again: what a
    store behind a network partition looks like to its clients."""

    def __init__(self, target_port: int, delay_s: float = 0.0):
        # delay_s: added before each request chunk, a store farther away than loopback, so
        # every task lasts long enough to be hit mid-task
        self.target, self.port, self.delay_s = target_port, free_port(), delay_s
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "PausableProxy":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # paused or stopped
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b, delay in ((client, upstream, self.delay_s), (upstream, client, 0.0)):
                threading.Thread(target=self._pump, args=(a, b, delay), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while chunk := src.recv(65536):
                if delay:
                    time.sleep(delay)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._conns.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def pause(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            self._drop(s)

    def resume(self) -> None:
        self.start()

    def stop(self) -> None:
        self.pause()


@dataclass
class Workers:
    """One `clipfleet worker` per queue, each in its own process group."""
    logs: Path
    broker: str
    env: dict
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    started: list[subprocess.Popen] = field(default_factory=list)

    def start(self, queue: str) -> subprocess.Popen:
        log = open(self.logs / f"worker-{queue}-{len(self.started)}.log", "ab")
        proc = subprocess.Popen(CLI + ["worker", "--queues", queue, "--broker", self.broker, "--concurrency", "1"],
                                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[queue] = proc
        self.started.append(proc)
        return proc

    def wait_ready(self, timeout: float = 180) -> None:
        """Every queue's current worker consumes (its log says ready), before a fault that
        would stop a starting one (a worker refuses to start while Redis is away)."""
        from tests.helpers import wait_until
        for queue, proc in self.procs.items():
            log = self.logs / f"worker-{queue}-{self.started.index(proc)}.log"
            wait_until(lambda: proc.poll() is not None or " ready." in log.read_text(errors="replace"),
                       timeout, f"the {queue} worker")
            assert proc.poll() is None, f"the {queue} worker exited: {log.read_text()[-3000:]}"

    def signal(self, queue: str, sig: int) -> None:
        """SIGKILL: the whole node (worker and pool processes), as a lost machine. SIGTERM: the
        worker's main process only, as a scale-down sends it to PID 1 of a pod."""
        proc = self.procs[queue]
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(60)

    def stop(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)


def delivered(broker: str, older_than: float = 0.3) -> dict[str, list[tuple[str, str, str]]]:
    """Queue -> (delivery tag, task name, args) of every message a worker took and has not acked
    yet (kombu's unacked hash); with prefetch 1 and late acks that is a task running now."""
    import redis
    client = redis.Redis.from_url(broker, socket_timeout=2, socket_connect_timeout=2)
    since = dict(client.zrange("unacked_index", 0, -1, withscores=True))
    out: dict[str, list] = {}
    for tag, raw in client.hgetall("unacked").items():
        if time.time() - since.get(tag, time.time()) < older_than:
            continue
        message, _exchange, routing_key = json.loads(raw)
        headers = message.get("headers") or {}
        out.setdefault(routing_key, []).append((tag.decode(), headers.get("task"), headers.get("argsrepr")))
    return out


def queue_of(stage: str) -> str:
    return QUEUES[stage]


def read_table(store: Store, rel: str):
    return pq.read_table(io.BytesIO(store.read_bytes(rel)))


def index_ids(store: Store) -> np.ndarray:
    """Every id the serving index holds (from the faiss structure itself, not a search)."""
    import faiss

    from clipfleet.shared.serving import ServingIndex
    index = ServingIndex.open(store)._state.index
    if index is None:
        return np.zeros(0, np.int64)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        lists = ivf.invlists
        ids = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
               for i in range(ivf.nlist) if lists.list_size(i)]
        return np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def check_published(store: Store) -> dict:
    """Every sample the CLIP filter kept is in dataset/ and in the index exactly once, no key
    twice, no dead letter anywhere. Returns counts for the test to print."""
    for stage in [*REGISTRY.names(), "index-train", "index-merge", "index-dedup"]:
        assert store.deadletters(stage) == [], f"{stage} has dead letters"
    clip_shards = sorted(store.done("clip"))
    assert clip_shards == sorted(store.done("download")) and clip_shards == sorted(store.done("tag"))
    kept, published, expected_ids = [], [], []
    for name in clip_shards:
        judged = read_table(store, layout.clip_shard(int(name)))
        kept += [(name, k) for k, ok in zip(judged["key"].to_pylist(), judged["kept"].to_pylist()) if ok]
        dataset = read_table(store, layout.dataset_shard(int(name), "parquet"))
        published += [(name, k) for k in dataset["key"].to_pylist()]
        meta = read_table(store, layout.embedding_metadata(int(name)))
        expected_ids += [layout.global_id(int(name), row) for row in range(meta.num_rows)]
        assert sorted(meta["key"].to_pylist()) == sorted(k for s, k in kept if s == name)
    assert kept, "the filter kept nothing: the run proves nothing"
    assert len(published) == len(set(published)), "a key is published twice"
    assert sorted(published) == sorted(kept)
    keys = [k for _, k in published]
    assert len(keys) == len(set(keys)), "a key appears in two shards"
    ids = index_ids(store)
    assert len(ids) == len(set(ids.tolist())), "an id is in the index twice"
    assert sorted(ids.tolist()) == sorted(expected_ids)
    infos = store.read_json(layout.index_infos("image"))
    assert sorted(infos["shards"]) == [int(s) for s in clip_shards if layout.global_id(int(s), 0) in set(expected_ids)]
    return {"shards": len(clip_shards), "kept": len(kept), "indexed": len(ids)}


def stage_times(store: Store, stage: str) -> list[tuple[float, float]]:
    """(started_at, finished_at) of every marker of `stage`."""
    return sorted((m["started_at"], m["finished_at"]) for m in store.markers(stage))


def shard_names(n: int) -> set[str]:
    return {shard_name(s) for s in range(n)}
