"""The cluster the manager runs: two redis-servers (a primary, a replica) and N limiter nodes.

It knows the inventory an SRE would keep (which node listens where, which
Redis is the primary) and serves it as `/topology`; the remedies and the
chaos hooks act through it. It never restarts a process by itself: a dead
node or Redis is the crew's incident.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from bus_schemas.errors import MendersError
from subjects.ratelimiter import keys
from subjects.ratelimiter.jsonlog import JsonLog
from subjects.ratelimiter.node import NodeConfig
from subjects.ratelimiter.options import RatelimiterOptions
from subjects.ratelimiter.procs import ProcessManager, free_port, wait_port

START_TIMEOUT_S = 10.0
REAP_EVERY_S = 0.2


class ClusterError(MendersError, RuntimeError):
    pass


@dataclass
class RedisServer:
    name: str
    port: int
    dir: Path

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"


@dataclass
class NodeHandle:
    id: str
    port: int
    dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.dir / "node.json"


def redis_binary(configured: str) -> str:
    found = configured or shutil.which("redis-server")
    if not found:
        raise ClusterError("redis-server not found: install the Debian package redis-server")
    return found


class Cluster:
    def __init__(self, data_dir: Path, options: RatelimiterOptions) -> None:
        self.data_dir = data_dir
        self.options = options
        self.binary = redis_binary(options.redis_server)
        self.pm = ProcessManager(data_dir)
        self.log = JsonLog(data_dir / "logs" / "app.log", component="manager")
        self.servers = {name: RedisServer(name, free_port(), data_dir / name)
                        for name in ("redis-a", "redis-b")}
        self.primary, self.replica = "redis-a", "redis-b"
        self.nodes = [NodeHandle(f"node-{i}", free_port(), data_dir / f"node-{i}")
                      for i in range(1, options.nodes + 1)]
        self._redis: dict[int, aioredis.Redis] = {}
        self._http: aiohttp.ClientSession | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        await self.start_redis(self.primary)
        await self.start_redis(self.replica, replicaof=self.servers[self.primary].port)
        await self.seed_limits()
        for node in self.nodes:
            self.write_node_config(node, NodeConfig(
                "127.0.0.1", self.servers[self.primary].port, nodes=len(self.nodes),
                window_s=self.options.window_s))
            await self.start_node(node)

    async def close(self) -> None:
        await asyncio.to_thread(self.pm.stop_all)
        for client in self._redis.values():
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
        if self._http is not None:
            await self._http.close()
        self.log.close()

    async def reap_forever(self) -> None:
        """Journal every child exit with the last line it wrote (what `systemctl status` shows)."""
        while True:
            for name, rc in self.pm.reap().items():
                self.log.write("error" if rc not in (0, -15) else "info", "process exited",
                               process=name, returncode=rc, last_output=self._last_line(name))
            await asyncio.sleep(REAP_EVERY_S)

    def _last_line(self, name: str) -> str:
        path = self.servers[name].log if name in self.servers else (
            self.data_dir / "logs" / f"{name}.out")
        with contextlib.suppress(OSError):
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
            return lines[-1][-300:] if lines else ""
        return ""

    # -- redis ------------------------------------------------------------------------

    async def start_redis(self, name: str, replicaof: int | None = None) -> bool:
        """Start a redis-server; False if it exited (a corrupt dump, say) instead of serving."""
        server = self.servers[name]
        server.dir.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, "--port", str(server.port), "--bind", "127.0.0.1",
                "--dir", str(server.dir), "--dbfilename", "dump.rdb", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
                "--enable-debug-command", "local", "--logfile", ""]
        if replicaof is not None:
            argv += ["--replicaof", "127.0.0.1", str(replicaof)]
        proc = self.pm.start(name, argv, server.log)
        ok = await asyncio.to_thread(wait_port, server.port, proc, START_TIMEOUT_S)
        self.log.write("info" if ok else "error", "redis started" if ok else "redis failed",
                       process=name, port=server.port, replicaof=replicaof)
        return ok

    def redis(self, name: str) -> aioredis.Redis:
        port = self.servers[name].port
        if port not in self._redis:
            self._redis[port] = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0,
                                               socket_connect_timeout=0.5,
                                               retry=Retry(NoBackoff(), 0))
        return self._redis[port]

    async def seed_limits(self) -> None:
        await self.redis(self.primary).hset(
            keys.LIMITS, mapping={c: o.limit for c, o in self.options.clients.items()})

    # -- nodes ------------------------------------------------------------------------

    def node(self, node_id: str) -> NodeHandle:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    def write_node_config(self, node: NodeHandle, cfg: NodeConfig) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        cfg.write(node.config_path)

    def node_config(self, node: NodeHandle) -> NodeConfig:
        return NodeConfig.read(node.config_path)

    async def start_node(self, node: NodeHandle) -> None:
        argv = [sys.executable, "-m", "subjects.ratelimiter", "node", "--id", node.id,
                "--port", str(node.port), "--config", str(node.config_path),
                "--log", str(self.data_dir / "logs" / f"{node.id}.log")]
        proc = self.pm.start(node.id, argv, self.data_dir / "logs" / f"{node.id}.out")
        if not await asyncio.to_thread(wait_port, node.port, proc, START_TIMEOUT_S):
            raise ClusterError(f"{node.id} did not start: {self._last_line(node.id)}")
        self.log.write("info", "node started", process=node.id, port=node.port,
                       pid=proc.pid)

    async def health(self, node: NodeHandle) -> dict[str, Any] | None:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5))
        try:
            async with self._http.get(f"{node.url}/health") as resp:
                return dict(await resp.json()) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def reload_node(self, node: NodeHandle, cfg: NodeConfig) -> None:
        """Write the node's config and SIGHUP it; returns once its /health shows the reload."""
        before = await self.health(node)
        self.write_node_config(node, cfg)
        if before is None or not self.pm.alive(node.id):
            return  # a dead node reads it when it is started
        self.pm.signal(node.id, 1)  # SIGHUP
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            now = await self.health(node)
            if now is not None and now["generation"] > before["generation"]:
                return
            await asyncio.sleep(0.05)
        raise ClusterError(f"{node.id} did not reload its config within 3s")

    def topology(self) -> dict[str, Any]:
        return {
            "nodes": [{"id": n.id, "url": n.url} for n in self.nodes],
            "redis": {role: {"name": name, "host": "127.0.0.1",
                             "port": self.servers[name].port}
                      for role, name in (("primary", self.primary), ("replica", self.replica))},
            "window_s": self.options.window_s,
        }
