"""The ratelimiter's independent oracle: its real health from the processes and Redis itself.

Served as `GET /oracle` on the manager's chaos port (subjects/chaoshttp.py). It
reads no chaos flag and no node's Prometheus text (what the crew's observer
reads): each node process is asked whether it runs (its PID) and what it
really runs (its /health: build, store, Redis port, after any reload); each
redis-server is asked for its role and link (INFO replication), the primary for
who holds a connection to it (CLIENT LIST), how fast it answers (PING) and what
its window counters hold (PTTL, ZCARD against the limits it stores).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from subjects.chaoshttp import ActionTally, Check
from subjects.ratelimiter import keys
from subjects.ratelimiter.actions import ACTIONS
from subjects.ratelimiter.cluster import Cluster, NodeHandle

HTTP_TIMEOUT_S = 0.4
REDIS_TIMEOUT_S = 0.8  # above one DEBUG SLEEP burst: a slow server still gets a verdict
PING_SLOW_MS = 120.0  # loopback PING takes well under 5 ms
# Three pings 100 ms apart: one lands in the first 100 ms of any stall that repeats every
# <= 300 ms and lasts >= 250 ms (redis_slow's DEBUG SLEEP), and so waits >= 150 ms.
PING_SPACING_S = 0.1
ORACLE_CLIENT = "rl-oracle"
# No action restarts a redis-server: after failover_redis cures primary_killed the old
# primary stays down. Its absence is lost redundancy ("degraded"), not a failure, or
# that fault could never be cured. True: a missing replica fails the oracle.
REPLICA_REQUIRED = False


class RatelimiterOracle:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.tally = ActionTally(ACTIONS)
        self.tally.tee(cluster.log)  # the manager's journal, where action_route logs
        self._http: aiohttp.ClientSession | None = None
        self._redis: dict[int, aioredis.Redis] = {}

    def checks(self) -> Mapping[str, Check]:
        found: dict[str, Check] = {"nodes": self.nodes, "redis": self.roles,
                                   "latency": self.latency, "windows": self.windows}
        if REPLICA_REQUIRED:
            found["replica"] = self.replica_up
        return found

    def degraded(self) -> Mapping[str, Check]:
        return {} if REPLICA_REQUIRED else {"replica": self.replica_up}

    def effects(self) -> dict[str, int]:
        return self.tally.effects()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        for r in self._redis.values():
            with contextlib.suppress(RedisError, OSError):
                await r.aclose()
        self._redis.clear()

    # -- I/O ----------------------------------------------------------------------------

    def _r(self, name: str) -> aioredis.Redis:
        port = self.cluster.servers[name].port
        if port not in self._redis:
            self._redis[port] = aioredis.Redis(
                host="127.0.0.1", port=port, socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=0.3, retry=Retry(NoBackoff(), 0),
                client_name=ORACLE_CLIENT)
        return self._redis[port]

    async def _health(self, node: NodeHandle) -> dict[str, Any] | None:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))
        try:
            async with self._http.get(f"{node.url}/health") as resp:
                return dict(await resp.json()) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def _client_names(self) -> set[str] | None:
        try:
            return {str(c.get("name", "")) for c in await self._r(self.cluster.primary)
                    .client_list()}
        except (RedisError, OSError):
            return None

    def _dead(self, name: str) -> str:
        rc = self.cluster.pm.exits.get(name)
        return f"{name}: process not running" + (f" (exit code {rc})" if rc is not None else "")

    # -- checks -------------------------------------------------------------------------

    async def nodes(self) -> list[str]:
        """Every node process alive and answering, on the good build and the shared store,
        pointed at the primary and holding a connection to it (the primary's CLIENT LIST)."""
        c = self.cluster
        primary, port = c.primary, c.servers[c.primary].port
        names_task = asyncio.ensure_future(self._client_names())
        healths = await asyncio.gather(*(self._health(n) for n in c.nodes))
        names = await names_task
        failing = []
        for node, health in zip(c.nodes, healths, strict=True):
            if not c.pm.alive(node.id):
                failing.append(self._dead(node.id))
                continue
            if health is None:
                failing.append(f"{node.id}: process runs but /health does not answer")
                continue
            if health.get("build") != keys.GOOD_BUILD:
                failing.append(f"{node.id}: runs build {health.get('build')}, "
                               f"not {keys.GOOD_BUILD}")
            if health.get("store") != "redis":
                failing.append(f"{node.id}: counts in store {health.get('store')!r}, "
                               "not the shared Redis")
                continue  # a local store does not talk to Redis for its counts
            if health.get("redis_port") != port:
                failing.append(f"{node.id}: uses Redis on port {health.get('redis_port')}, "
                               f"the primary {primary} is on {port}")
            elif names is not None and keys.connection_name(node.id) not in names:
                failing.append(f"{node.id}: no connection to the primary {primary} "
                               "(not in its CLIENT LIST)")
        return failing

    async def replica_up(self) -> list[str]:
        replica = self.cluster.replica
        return [] if self.cluster.pm.alive(replica) else [f"replica {self._dead(replica)}"]

    async def roles(self) -> list[str]:
        """The primary up and a master; the replica, where it runs, replicating from it
        with its link up (a live replica of nothing, or a second master, is a failure)."""
        c = self.cluster
        primary, replica = c.primary, c.replica
        p_port = c.servers[primary].port

        async def info(name: str) -> dict[str, Any] | str:
            if not c.pm.alive(name):
                return self._dead(name)
            try:
                return dict(await self._r(name).info("replication"))
            except (RedisError, OSError) as exc:
                return f"{name}: does not answer: {type(exc).__name__}: {exc}"[:200]

        p_info, r_info = await asyncio.gather(info(primary), info(replica))
        failing = []
        if isinstance(p_info, str):
            failing.append(f"primary {p_info}")
        elif p_info.get("role") != "master":
            failing.append(f"primary {primary}: has role {p_info.get('role')!r}, not master")
        if not c.pm.alive(replica):
            pass  # replica_up says so
        elif isinstance(r_info, str):
            failing.append(f"replica {r_info}")
        elif r_info.get("role") != "slave" or int(r_info.get("master_port", 0)) != p_port:
            failing.append(f"replica {replica}: not replicating from {primary} (role "
                           f"{r_info.get('role')!r}, master port {r_info.get('master_port')})")
        elif r_info.get("master_link_status") != "up":
            failing.append(f"replica {replica}: link to {primary} is "
                           f"{r_info.get('master_link_status')}")
        return failing

    async def latency(self) -> list[str]:
        """The primary answers PING promptly, at three moments a stall cannot all miss."""
        primary = self.cluster.primary
        if not self.cluster.pm.alive(primary):
            return []  # `redis` says it is down

        async def ping(after_s: float) -> float:
            await asyncio.sleep(after_s)
            started = time.perf_counter()
            try:
                await self._r(primary).ping()
            except (RedisError, OSError):
                pass  # no answer within the socket timeout: as slow as that
            return 1000 * (time.perf_counter() - started)

        worst = max(await asyncio.gather(*(ping(i * PING_SPACING_S) for i in range(3))))
        if worst > PING_SLOW_MS:
            return [f"primary {primary}: PING took {worst:.0f} ms "
                    f"(healthy: under {PING_SLOW_MS:.0f})"]
        return []

    async def windows(self) -> list[str]:
        """Every window counter expires (has a TTL) and holds no more than its limit."""
        primary = self.cluster.primary
        if not self.cluster.pm.alive(primary):
            return []
        r = self._r(primary)
        try:
            limits = {keys.text(k): int(v) for k, v in (await r.hgetall(keys.LIMITS)).items()}
            counters = await keys.window_counters(r)
        except (RedisError, OSError) as exc:
            return [f"windows: primary {primary} does not answer: {type(exc).__name__}"]
        if not limits:
            return [f"windows: primary {primary} holds no limits ({keys.LIMITS} missing)"]
        failing = []
        for name, (pttl, count) in counters.items():
            limit = limits.get(keys.client_of(name), 0)
            if pttl == -1:
                failing.append(f"{name}: no TTL ({count} entries, limit {limit})")
            elif count > limit:
                failing.append(f"{name}: {count} entries in the window, over its limit {limit}")
        return failing
