"""Where the dedup claims live: one Redis (the broker's, by default), a list of Redis nodes
partitioned by digest, or a Redis Cluster (`--dedup-redis URL,URL,...`; a node that reports
cluster_enabled makes the list the cluster's startup nodes).

A digest's top GROUP_BITS bits pick one of GROUPS groups. Every key of a group carries the
group's hash tag, and each tag lands in its own 1/GROUPS of the 16384 cluster slots, so a
cluster whose slots are split in even ranges (what `redis-cli --cluster create` does) holds
even shares. One script call touches the keys of one group on a cluster (one slot), or of
one node in a partitioned list; those calls are pipelined per node.
"""
from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

import numpy as np
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from clipfleet.workers.extract.options import MAX_DEDUP_NODES, dedup_redis_urls

GROUP_BITS = 6
GROUPS = 2**GROUP_BITS
assert GROUPS >= MAX_DEDUP_NODES
_SLOTS_PER_GROUP = REDIS_CLUSTER_HASH_SLOTS // GROUPS
_TIMEOUTS = {"socket_timeout": 30, "socket_connect_timeout": 5}


@lru_cache(maxsize=None)
def _tags() -> tuple[str, ...]:
    """The first decimal string whose slot falls in each group's range (a fixed function of
    the CRC16 Redis Cluster uses, so every worker and every release computes the same)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < GROUPS:
        tag = str(i)
        found.setdefault(key_slot(tag.encode()) // _SLOTS_PER_GROUP, tag)
        i += 1
    return tuple(found[g] for g in range(GROUPS))


def group_tag(group: int) -> str:
    return _tags()[group]


def connect(spec) -> "ClaimNodes":
    """Clients for `--dedup-redis`: a cluster when the first node that answers says it is one,
    else the listed nodes in order (the order is the partition: keep it for the run's life)."""
    try:
        urls = dedup_redis_urls(spec)
    except ValueError as exc:
        raise ValueError(f"--dedup-redis: {exc}") from exc
    if not urls:
        raise ValueError("--dedup-redis: no URL given")
    clients = [redis.Redis.from_url(u, **_TIMEOUTS) for u in urls]
    for client in clients:
        try:
            enabled = client.info("cluster").get("cluster_enabled")
        except (redis.ConnectionError, redis.TimeoutError):
            continue
        if enabled:
            kwargs = {k: v for k, v in client.connection_pool.connection_kwargs.items()
                      if k in ("username", "password")}
            kwargs["ssl"] = urls[0].startswith("rediss://")
            nodes = [ClusterNode(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
                     for c in clients if "host" in c.connection_pool.connection_kwargs]
            return ClaimNodes(cluster=RedisCluster(startup_nodes=nodes, **kwargs, **_TIMEOUTS))
        break
    else:
        raise redis.ConnectionError(f"no --dedup-redis node answers: {', '.join(urls)}")
    return ClaimNodes(clients=clients)


class ClaimNodes:
    """Standalone nodes (one call per node per batch, node = group % len) or a cluster (one
    call per group, pipelined per node, redirections left to redis-py's cluster client)."""

    TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError,
                 redis.exceptions.TryAgainError, redis.exceptions.BusyLoadingError)

    def __init__(self, clients: list | None = None, cluster: RedisCluster | None = None):
        if bool(clients) == (cluster is not None):
            raise ValueError("claims go to a list of nodes or to one cluster")
        self.clients = clients or []
        self.cluster = cluster

    @classmethod
    def of(cls, client) -> "ClaimNodes":
        if isinstance(client, RedisCluster):
            return cls(cluster=client)
        return cls(clients=list(client) if isinstance(client, (list, tuple)) else [client])

    def register_script(self, text: str):
        return (self.cluster or self.clients[0]).register_script(text)

    def client_for(self, key: str, group: int):
        """A client that reads `key` (of digest group `group`)."""
        return self.cluster if self.cluster is not None else self.clients[group % len(self.clients)]

    def split(self, groups: np.ndarray):
        """(part, indices into the batch) for each script call a batch needs."""
        parts = groups if self.cluster is not None else groups % len(self.clients)
        if self.cluster is None and len(self.clients) == 1:
            yield 0, np.arange(len(groups))
            return
        for part in np.unique(parts):
            yield int(part), np.nonzero(parts == part)[0]

    def run(self, script, calls: list[tuple[int, list[str], list]]) -> list[bytes]:
        """Each call's reply, in order. A call may run twice (a retry after a lost reply):
        the claim script gives the same answer to the same owner."""
        if self.cluster is None:
            return self._run_nodes(script, calls)
        by_node = defaultdict(list)
        for i, (_, keys, _) in enumerate(calls):
            by_node[self.cluster.get_node_from_key(keys[0]).name].append(i)
        replies: list = [None] * len(calls)
        for name, members in by_node.items():
            try:
                pipe = self.cluster.get_redis_connection(self.cluster.get_node(node_name=name)).pipeline(
                    transaction=False)
                for i in members:
                    script(keys=calls[i][1], args=calls[i][2], client=pipe)
                for i, reply in zip(members, pipe.execute(raise_on_error=False)):
                    replies[i] = reply
            except Exception:  # node gone or moved: the cluster client's own retries decide
                pass
            for i in members:
                if replies[i] is None or isinstance(replies[i], Exception):
                    replies[i] = script(keys=calls[i][1], args=calls[i][2], client=self.cluster)
        return replies

    def _run_nodes(self, script, calls):
        if len(self.clients) == 1:
            return [script(keys=keys, args=args, client=self.clients[0]) for _, keys, args in calls]
        pipes = {}
        for part, keys, args in calls:
            pipe = pipes.setdefault(part, self.clients[part].pipeline(transaction=False))
            script(keys=keys, args=args, client=pipe)
        out = {part: iter(pipe.execute()) for part, pipe in pipes.items()}
        return [next(out[part]) for part, _, _ in calls]
