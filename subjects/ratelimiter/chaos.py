"""Chaos hooks: real faults injected into the running cluster, on a port no actor is told.

Each changes real behaviour: a node process SIGKILLed, a node's config
pointed at a port nobody listens on, DEBUG SLEEP bursts on the primary,
window counters written without TTL, a node reloaded onto a build whose
check never denies, a node reloaded onto its in-memory store, the primary
SIGKILLed, and both redis-servers restarted onto a corrupted dump. The
symptoms are whatever the observer then measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from abc import ABC, abstractmethod

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from subjects.chaoshttp import add_oracle, chaos_app
from subjects.ratelimiter import keys
from subjects.ratelimiter.cluster import Cluster, NodeHandle
from subjects.ratelimiter.oracle import RatelimiterOracle
from subjects.ratelimiter.procs import free_port

SLEEP_BURST_S = 0.25
SLEEP_GAP_S = 0.05
STUCK_ENTRIES = 2000  # above any limit set_limit may set (MAX_LIMIT)
STUCK_AHEAD_MS = 3600_000


class Fault(ABC):
    name: str

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    @abstractmethod
    async def inject(self) -> None: ...

    @abstractmethod
    async def clear(self) -> None: ...

    def node(self, index: int) -> NodeHandle:
        return self.cluster.nodes[index % len(self.cluster.nodes)]


class NodeKilled(Fault):
    name = "node_killed"

    async def inject(self) -> None:
        self.cluster.pm.signal(self.node(1).id, signal.SIGKILL)

    async def clear(self) -> None:
        await heal_nodes(self.cluster)


class _NodeConfigFault(Fault):
    """A bad config written to a node's file and loaded on SIGHUP (a bad config push)."""

    index = 0

    @abstractmethod
    def bad(self) -> dict[str, object]: ...

    async def inject(self) -> None:
        node = self.node(self.index)
        cfg = dataclasses.replace(self.cluster.node_config(node), **self.bad())  # type: ignore[arg-type]
        await self.cluster.reload_node(node, cfg)

    async def clear(self) -> None:
        await heal_nodes(self.cluster)


class RedisLinkCut(_NodeConfigFault):
    name = "redis_link_cut"
    index = 0

    def bad(self) -> dict[str, object]:
        return {"redis_port": free_port()}  # nobody listens there


class BadBuild(_NodeConfigFault):
    name = "bad_build"
    index = -1

    def bad(self) -> dict[str, object]:
        return {"build": keys.BAD_BUILD}


class LocalStore(_NodeConfigFault):
    """A node counting in its own memory: what it allows never reaches Redis."""

    name = "local_store"
    index = 1

    def bad(self) -> dict[str, object]:
        return {"store": "local"}


class RedisSlow(Fault):
    name = "redis_slow"
    task: asyncio.Task[None] | None = None

    async def _bursts(self, port: int) -> None:
        r = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0)
        try:
            while True:
                with contextlib.suppress(RedisError, OSError):
                    await r.execute_command("DEBUG", "SLEEP", SLEEP_BURST_S)
                await asyncio.sleep(SLEEP_GAP_S)
        finally:
            await r.aclose()

    async def inject(self) -> None:
        if self.task is None or self.task.done():
            port = self.cluster.servers[self.cluster.primary].port
            self.task = asyncio.get_running_loop().create_task(self._bursts(port))

    async def clear(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


def _stuck_client(cluster: Cluster) -> str:
    return max(cluster.options.clients, key=lambda c: cluster.options.clients[c].rps)


class CountersWithoutTtl(Fault):
    """A window counter written far ahead and without a TTL: the client is locked out."""

    name = "counters_without_ttl"

    async def inject(self) -> None:
        r = self.cluster.redis(self.cluster.primary)
        key = keys.window_key(_stuck_client(self.cluster))
        ahead = int(time.time() * 1000) + STUCK_AHEAD_MS
        await r.zadd(key, {f"import-{i}": ahead + i for i in range(STUCK_ENTRIES)})
        await r.persist(key)

    async def clear(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.cluster.redis(self.cluster.primary).delete(
                keys.window_key(_stuck_client(self.cluster)))


class PrimaryKilled(Fault):
    name = "primary_killed"

    async def inject(self) -> None:
        self.cluster.pm.signal(self.cluster.primary, signal.SIGKILL)

    async def clear(self) -> None:
        await heal_redis(self.cluster)


class DataCorrupted(Fault):
    """Both dumps overwritten with garbage, both servers restarted: neither can load."""

    name = "data_corrupted"

    async def inject(self) -> None:
        c = self.cluster
        for name, server in c.servers.items():
            await asyncio.to_thread(c.pm.kill, name)
            (server.dir / "dump.rdb").write_bytes(b"REDIS0011" + os.urandom(4096))
        await c.start_redis(c.primary)
        await c.start_redis(c.replica, replicaof=c.servers[c.primary].port)

    async def clear(self) -> None:
        await heal_redis(self.cluster)


async def heal_nodes(cluster: Cluster) -> None:
    """Every node running, on the good build, the shared store and the current primary."""
    port = cluster.servers[cluster.primary].port
    for node in cluster.nodes:
        good = dataclasses.replace(cluster.node_config(node), redis_port=port,
                                   build=keys.GOOD_BUILD, store="redis")
        if not cluster.pm.alive(node.id):
            cluster.write_node_config(node, good)
            await cluster.start_node(node)
        elif cluster.node_config(node) != good:
            await cluster.reload_node(node, good)


async def _fresh(cluster: Cluster, name: str, replicaof: int | None) -> None:
    await asyncio.to_thread(cluster.pm.kill, name)
    with contextlib.suppress(FileNotFoundError):
        (cluster.servers[name].dir / "dump.rdb").unlink()
    await cluster.start_redis(name, replicaof)


async def heal_redis(cluster: Cluster) -> None:
    """A live primary (the replica promoted, or a fresh one) and a live replica of it."""
    c = cluster
    if not c.pm.alive(c.primary):
        if c.pm.alive(c.replica):
            await c.redis(c.replica).execute_command("REPLICAOF", "NO", "ONE")
            c.primary, c.replica = c.replica, c.primary
        else:
            await _fresh(c, c.primary, None)
    if not c.pm.alive(c.replica):
        await _fresh(c, c.replica, c.servers[c.primary].port)
    else:
        with contextlib.suppress(RedisError, OSError):
            await c.redis(c.replica).execute_command(
                "REPLICAOF", "127.0.0.1", str(c.servers[c.primary].port))
    await c.seed_limits()
    await heal_nodes(c)


class Chaos:
    def __init__(self, cluster: Cluster) -> None:
        faults: list[Fault] = [NodeKilled(cluster), RedisLinkCut(cluster), RedisSlow(cluster),
                               CountersWithoutTtl(cluster), BadBuild(cluster),
                               LocalStore(cluster), PrimaryKilled(cluster),
                               DataCorrupted(cluster)]
        self.cluster = cluster
        self.faults = {f.name: f for f in faults}
        self.injected: dict[str, float] = {}

    async def inject(self, name: str) -> None:
        await self.faults[name].inject()
        self.injected[name] = time.time()  # never journaled: the crew tails the journal

    async def clear(self, name: str) -> None:
        await self.faults[name].clear()
        self.injected.pop(name, None)

    def listing(self) -> dict[str, float]:
        return self.injected

    async def clear_all(self) -> None:
        """Every fault cleared and the cluster back to its healthy baseline."""
        for fault in self.faults.values():
            with contextlib.suppress(Exception):
                await fault.clear()
        self.injected.clear()
        await heal_redis(self.cluster)


def make_chaos_app(chaos: Chaos) -> web.Application:
    """The chaos port (subjects/chaoshttp.py) with `POST /reset` (every fault cleared, the
    cluster healed); inject and clear answer without the active faults. `GET /oracle`
    judges the cluster from its processes and Redis (subjects/ratelimiter/oracle.py);
    build it before the service serves, so its action tally misses none."""
    app = chaos_app(chaos, reset=chaos.clear_all, active_in_replies=False)
    oracle = RatelimiterOracle(chaos.cluster)
    add_oracle(app, oracle.checks, oracle.effects, oracle.degraded)

    async def close(_: web.Application) -> None:
        await oracle.close()

    app.on_cleanup.append(close)
    return app
