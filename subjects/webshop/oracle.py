"""The webshop's independent oracle: its real health from the Shop's own objects.

Served as `GET /oracle` on the chaos port (subjects/chaoshttp.py). Nothing here
reads a chaos flag or the Prometheus metrics the crew's observer scrapes (and
nothing here moves them: the pool probe takes a connection straight from the
pool, not through the catalog that times and counts queries). Each check
reads the thing itself: who holds the pool's connections and for how long, the
active replica's latency, the deployed config's rules, the cache's contents,
the worker's allocations, the log directory's bytes and writers, and whether
the payments upstream accepts a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

from subjects.chaoshttp import ActionTally, Check, Periodic
from subjects.webshop.actions import ACTIONS
from subjects.webshop.db import PooledConnection, PoolTimeout
from subjects.webshop.payments import PaymentsService
from subjects.webshop.shop import Shop

MIB = 1024 * 1024
SAMPLE_EVERY_S = 0.25
LEAK_AGE_S = 2.0  # a request holds a connection for milliseconds; this long is a leak
PROBE_TIMEOUT_S = 0.2
UPSTREAM_TIMEOUT_S = 0.3
WORKER_HELD_LIMIT = 8 * MIB  # a healthy worker keeps no long-lived allocations at all
LOG_DIR_LIMIT = 20 * MIB  # the live log and its two 4 MiB backups stay below 12 MiB


class PoolWatch:
    """When each checked-out connection was first seen checked out (sampled)."""

    def __init__(self, shop: Shop) -> None:
        self.shop = shop
        self.since: dict[int, tuple[PooledConnection, float]] = {}
        self.ticker = Periodic(self.sample, SAMPLE_EVERY_S)

    def sample(self) -> None:
        # The pool keeps no checkout times: `_in_use` is the only record of who holds what.
        in_use = set(self.shop.pool._in_use)
        now = time.monotonic()
        kept = {k: v for k, v in self.since.items() if v[0] in in_use}
        for conn in in_use:
            kept.setdefault(id(conn), (conn, now))
        self.since = kept

    def leaked(self) -> int:
        self.sample()
        cutoff = time.monotonic() - LEAK_AGE_S
        return sum(1 for _, first in self.since.values() if first <= cutoff)

    def start(self) -> None:
        self.ticker.start()

    async def stop(self) -> None:
        await self.ticker.stop()


class ShopOracle:
    def __init__(self, shop: Shop, payments: PaymentsService) -> None:
        self.shop = shop
        self.payments = payments
        self.pool_watch = PoolWatch(shop)
        self.tally = ActionTally(ACTIONS)
        self.tally.tee(shop.logs.log)  # before the service serves its first action

    def checks(self) -> Mapping[str, Check]:
        return {"pool": self.pool, "catalog": self.catalog, "config": self.config,
                "cache": self.cache, "worker": self.worker, "logs": self.logs,
                "upstream": self.upstream}

    def effects(self) -> dict[str, int]:
        return self.tally.effects()

    async def pool(self) -> list[str]:
        pool = self.shop.pool
        failing = []
        leaked = self.pool_watch.leaked()
        if leaked:
            failing.append(f"pool: {pool.in_use}/{pool.size} connections checked out, "
                           f"{leaked} held over {LEAK_AGE_S:g} s (leaked)")
        try:  # the real question: can a request get a connection now?
            conn = await pool.acquire(PROBE_TIMEOUT_S)
        except PoolTimeout:
            failing.append(f"pool: no connection free within {PROBE_TIMEOUT_S * 1000:.0f} ms "
                           f"({pool.in_use}/{pool.size} checked out, {pool.waiting} waiting)")
        else:
            pool.release(conn)
        return failing

    async def catalog(self) -> list[str]:
        replica = self.shop.catalog.replica
        if replica.extra_latency_s > 0:
            return [f"catalog: active replica {replica.name} adds "
                    f"{replica.extra_latency_s * 1000:.0f} ms to every call"]
        return []

    async def config(self) -> list[str]:
        cfg = self.shop.config.active
        if cfg.failing_fraction > 0:
            return [f"config {cfg.version}: its pricing rule fails "
                    f"{cfg.failing_fraction:.0%} of requests"]
        return []

    async def cache(self) -> list[str]:
        cache = self.shop.cache
        if not cache.enabled:
            return ["cache: disabled (every read runs the uncached aggregate)"]
        if not cache.details:
            return ["cache: enabled but empty"]
        return []

    async def worker(self) -> list[str]:
        held = self.shop.worker.held_bytes()
        if held > WORKER_HELD_LIMIT:
            return [f"worker: {held / MIB:.0f} MiB of allocations held "
                    f"(a healthy worker holds none)"]
        return []

    async def logs(self) -> list[str]:
        logs = self.shop.logs
        failing = []
        size = await asyncio.to_thread(logs.size_bytes)  # a bounded scandir, off the loop
        if size > LOG_DIR_LIMIT:
            failing.append(f"logs: {size / MIB:.0f} MiB in {logs.directory} "
                           f"(healthy: under {LOG_DIR_LIMIT // MIB} MiB)")
        if logs.writers:
            failing.append(f"logs: {len(logs.writers)} runaway writer(s) attached to "
                           "the log directory")
        return failing

    async def upstream(self) -> list[str]:
        host, port = self.payments.host, self.payments.port
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                               UPSTREAM_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            return [f"upstream: payments at {host}:{port} unreachable: "
                    f"{type(exc).__name__}: {exc}"[:200]]
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return []
