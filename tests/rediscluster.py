"""A Redis Cluster of real redis-server processes on loopback, made and removed by a test: each
node persists with an append-only file (fsync on every write) so a restarted node comes back
with what it acknowledged."""
from __future__ import annotations

import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path

import redis

from clipfleet.producer.fleet import _wait_for, find_redis_server, free_port

SLOTS = 16384


def _node_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class LocalCluster:
    def __init__(self, directory: Path, nodes: int):
        self.directory = directory
        self.ports = [_node_port() for _ in range(nodes)]
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{p}/0" for p in self.ports]

    def client(self, i: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports[i], socket_timeout=5)

    def start(self, i: int) -> None:
        port = self.ports[i]
        home = self.directory / str(port)
        home.mkdir(parents=True, exist_ok=True)
        self.procs[i] = subprocess.Popen(
            [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(home),
             "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", "1500", "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: self.client(i).ping(), f"redis-server :{port}", 20, self.procs[i])

    def create(self) -> None:
        """Even slot ranges, as `redis-cli --cluster create` makes them, then MEET."""
        n = len(self.ports)
        for i in range(n):
            self.client(i).execute_command("CLUSTER", "ADDSLOTS", *range(i * SLOTS // n, (i + 1) * SLOTS // n))
        for i in range(1, n):
            self.client(0).execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[i])
        self.wait_ok()

    def wait_ok(self, timeout: float = 60) -> None:
        def ok():
            for i in range(len(self.ports)):
                info = self.client(i).execute_command("CLUSTER", "INFO")
                info = info.decode() if isinstance(info, bytes) else info
                if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.ports)}" not in info:
                    return False
            return True
        _wait_for(ok, "the cluster", timeout)

    def kill(self, i: int) -> None:
        """SIGKILL: no shutdown save, only what the AOF already holds survives."""
        self.procs[i].kill()
        self.procs[i].wait(10)

    def restart(self, i: int) -> None:
        self.start(i)
        self.wait_ok()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def redis_cluster(directory: Path, nodes: int = 3):
    cluster = LocalCluster(directory, nodes)
    try:
        for i in range(nodes):
            cluster.start(i)
        cluster.create()
        yield cluster
    finally:
        cluster.stop()
