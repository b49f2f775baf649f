"""One limiter node: `GET /check?client=C` answers 200 (allowed), 429 (limited) or 503.

Its settings live in a JSON file (Redis address, build, store) that it reads
at start and again on SIGHUP, as a daemon reloads its config; it has no admin
HTTP endpoint. With Redis unreachable it fails closed (503): a limiter that
cannot count must not let everything through.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from subjects.ratelimiter import keys
from subjects.ratelimiter.jsonlog import JsonLog
from subjects.ratelimiter.limiter import SCRIPT, LocalWindow

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4,
                   0.5, 0.75, 1.0, 2.5)
REDIS_TIMEOUT_S = 1.0  # longer than a slow Redis's stall: a late answer is still counted
LIMITS_REFRESH_S = 1.0


@dataclass(frozen=True)
class NodeConfig:
    redis_host: str
    redis_port: int
    build: str = keys.GOOD_BUILD
    store: str = "redis"  # "local": windows in memory, limits still read from Redis
    nodes: int = 3
    window_s: float = 1.0

    @staticmethod
    def read(path: Path) -> NodeConfig:
        return NodeConfig(**json.loads(path.read_text()))

    def write(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        tmp.replace(path)


class NodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter("ratelimiter_decisions", "Requests by client and decision",
                                 ["client", "decision"], registry=r)
        self.latency = Histogram("ratelimiter_request_duration_seconds",
                                 "Check latency as served", buckets=LATENCY_BUCKETS, registry=r)
        self.redis_errors = Counter("ratelimiter_redis_errors", "Failed Redis calls",
                                    registry=r)
        self.build = Gauge("ratelimiter_build_info", "The running build", ["build"], registry=r)


class Node:
    def __init__(self, node_id: str, config_path: Path, log: JsonLog) -> None:
        self.node_id = node_id
        self.config_path = config_path
        self.log = log
        self.metrics = NodeMetrics()
        self.config = NodeConfig.read(config_path)
        self.redis = self._connect(self.config)
        self.local = LocalWindow()
        self.limits: dict[str, float] = {}
        self.seq = itertools.count()
        self.generation = 0
        self.started_at = time.time()
        self.last_redis_ok = 0.0
        self.metrics.build.labels(self.config.build).set(1)

    def _connect(self, cfg: NodeConfig) -> aioredis.Redis:
        return aioredis.Redis(host=cfg.redis_host, port=cfg.redis_port,
                              client_name=keys.connection_name(self.node_id),
                              socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=0.3,
                              retry=Retry(NoBackoff(), 0), max_connections=64)

    async def reload(self) -> None:
        """SIGHUP: re-read the config file, reconnect to Redis, swap the build."""
        old, self.config = self.redis, NodeConfig.read(self.config_path)
        self.redis = self._connect(self.config)
        self.local = LocalWindow()
        self.metrics.build.clear()
        self.metrics.build.labels(self.config.build).set(1)
        self.generation += 1
        self.log.write("info", "config reloaded", redis_port=self.config.redis_port,
                       build=self.config.build, store=self.config.store)
        with contextlib.suppress(RedisError, OSError):
            await old.aclose()

    async def refresh_limits(self) -> None:
        """The local store still takes its limits from Redis."""
        while True:
            if self.config.store == "local":
                with contextlib.suppress(RedisError, OSError):
                    raw = await self.redis.hgetall(keys.LIMITS)
                    self.limits = {keys.text(k): float(v) for k, v in raw.items()}
            await asyncio.sleep(LIMITS_REFRESH_S)

    async def decide(self, client: str) -> bool:
        cfg = self.config
        if cfg.store == "local":
            # It cannot see the other nodes: a conservative share of the limit.
            share = self.limits.get(client, 0.0) / (2 * cfg.nodes)
            return self.local.decide(client, share, cfg.window_s)
        now_ms = int(time.time() * 1000)
        member = f"{now_ms}-{self.node_id}-{next(self.seq)}"
        enforce = "0" if cfg.build == keys.BAD_BUILD else "1"
        reply = await self.redis.eval(SCRIPT, 3, keys.window_key(client), keys.LIMITS,
                                      keys.TALLY, now_ms, int(cfg.window_s * 1000), member,
                                      client, enforce)
        self.last_redis_ok = time.time()
        return bool(int(reply[0]))

    def health(self) -> dict[str, Any]:
        connected = time.time() - self.last_redis_ok < 2.0
        return {"status": "ok", "node": self.node_id, "build": self.config.build,
                "store": self.config.store, "redis_port": self.config.redis_port,
                "redis_ok_recently": connected, "generation": self.generation,
                "uptime_s": round(time.time() - self.started_at, 1)}


NODE_KEY = web.AppKey("node", Node)


async def check(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    client = request.query.get("client", "")
    started = time.perf_counter()
    try:
        if not client:
            return web.json_response({"error": "client is required"}, status=400)
        try:
            allowed = await node.decide(client)
        except (RedisError, OSError) as exc:
            node.metrics.redis_errors.inc()
            node.metrics.decisions.labels(client, "error").inc()
            node.log.write("error", "redis call failed", client=client,
                           redis_port=node.config.redis_port,
                           error=f"{type(exc).__name__}: {exc}"[:300])
            return web.json_response({"error": "limiter unavailable"}, status=503)
        decision = "allowed" if allowed else "limited"
        node.metrics.decisions.labels(client, decision).inc()
        return web.json_response({"allowed": allowed}, status=200 if allowed else 429)
    finally:
        node.metrics.latency.observe(time.perf_counter() - started)


async def health(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE_KEY].health())


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[NODE_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve_node(node_id: str, port: int, config_path: Path, log_path: Path) -> None:
    log = JsonLog(log_path, node=node_id)
    node = Node(node_id, config_path, log)
    app = web.Application()
    app[NODE_KEY] = node
    app.router.add_get("/check", check)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.3)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(node.reload()))
    refresher = loop.create_task(node.refresh_limits())
    log.write("info", "node started", port=port, build=node.config.build,
              redis_port=node.config.redis_port)
    try:
        await stop.wait()
    finally:
        log.write("info", "node stopping")
        refresher.cancel()
        await runner.cleanup()
        with contextlib.suppress(RedisError, OSError):
            await node.redis.aclose()
        log.close()
