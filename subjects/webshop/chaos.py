"""Chaos hooks: real faults injected into a running shop, on a port no actor is told.

Every fault changes real behaviour (connections held, sleeps on the dependency
path, a bad config deployed, memory held, files written, a site closed); the
symptoms an observer sees are measured from the requests the shop then serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from pathlib import Path

from aiohttp import web

from subjects.chaoshttp import add_oracle, chaos_app
from subjects.webshop.db import PooledConnection
from subjects.webshop.oracle import ShopOracle
from subjects.webshop.payments import PaymentsService
from subjects.webshop.shop import Shop

SLOW_REPLICA_LATENCY_S = 0.4
LEAK_CHUNK = 3 * 1024 * 1024  # 3 MiB every 100 ms: ~30 MB/s
LEAK_CAP = 350 * 1024 * 1024
FLOOD_CHUNK = 1024 * 1024  # 1 MiB every 100 ms: ~10 MB/s
FLOOD_CAP = 250 * 1024 * 1024
FLOOD_FILE_BYTES = 10 * 1024 * 1024
FLOOD_PREFIX = "trace-"


class Fault(ABC):
    name: str

    def __init__(self, shop: Shop) -> None:
        self.shop = shop

    @abstractmethod
    async def inject(self) -> None: ...

    @abstractmethod
    async def clear(self) -> None: ...

    @abstractmethod
    def effective(self) -> bool:
        """Whether the fault still acts (a remedy may have ended it)."""


class PoolExhaustion(Fault):
    """A stuck job that checks connections out and never returns them."""

    name = "pool_exhaustion"
    task: asyncio.Task[None] | None = None

    async def _leak(self) -> None:
        pool = self.shop.pool
        generation = pool.generation
        held: list[PooledConnection] = []
        try:
            while True:
                conn = await pool.acquire(None, priority=True)
                if conn.generation != generation:
                    pool.release(conn)
                    return  # the pool was recycled under it: the stuck job died with it
                held.append(conn)
        finally:
            for conn in held:
                pool.release(conn)

    async def inject(self) -> None:
        if not self.effective():
            self.task = asyncio.get_running_loop().create_task(self._leak())
            await asyncio.sleep(0)

    async def clear(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def effective(self) -> bool:
        return self.task is not None and not self.task.done()


class SlowDependency(Fault):
    name = "slow_dependency"

    async def inject(self) -> None:
        self.shop.catalog.replica.extra_latency_s = SLOW_REPLICA_LATENCY_S

    async def clear(self) -> None:
        for replica in self.shop.catalog.replicas:
            replica.extra_latency_s = 0.0

    def effective(self) -> bool:
        return self.shop.catalog.replica.extra_latency_s > 0


class BadConfig(Fault):
    name = "bad_config"

    async def inject(self) -> None:
        self.shop.config.deploy("v2")

    async def clear(self) -> None:
        if self.effective():
            self.shop.config.deploy("v1")

    def effective(self) -> bool:
        return self.shop.config.active.version == "v2"


class MemoryLeak(Fault):
    """Worker allocations that are never freed, until a worker restart."""

    name = "memory_leak"
    task: asyncio.Task[None] | None = None

    async def _leak(self) -> None:
        held = self.shop.worker.held
        while self.shop.worker.held_bytes() < LEAK_CAP:
            chunk = bytearray(LEAK_CHUNK)
            chunk[::4096] = b"\x01" * len(chunk[::4096])  # touch every page: real RSS
            held.append(chunk)
            await asyncio.sleep(0.1)
        await asyncio.Event().wait()  # keep holding until the worker restarts

    async def inject(self) -> None:
        if not self.effective():
            self.task = self.shop.worker.spawn(self._leak())

    async def clear(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.shop.worker.free()

    def effective(self) -> bool:
        return self.task is not None and not self.task.done()


def _write_chunk(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


class LogFlood(Fault):
    """A runaway trace writer attached to the log directory."""

    name = "log_flood"
    task: asyncio.Task[None] | None = None

    async def _flood(self) -> None:
        directory = self.shop.logs.directory
        line = b'{"level":"debug","msg":"cache trace","detail":"' + b"x" * 180 + b'"}\n'
        chunk = line * (FLOOD_CHUNK // len(line))
        written = 0
        while written < FLOOD_CAP:
            path = directory / f"{FLOOD_PREFIX}{written // FLOOD_FILE_BYTES:03d}.log"
            await asyncio.to_thread(_write_chunk, path, chunk)
            written += len(chunk)
            await asyncio.sleep(0.1)

    async def inject(self) -> None:
        if not self.effective():
            self.task = asyncio.get_running_loop().create_task(self._flood())
            self.shop.logs.attach(self.task)

    async def clear(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for path in self.shop.logs.directory.glob(f"{FLOOD_PREFIX}*.log"):
            with contextlib.suppress(OSError):
                path.unlink()

    def effective(self) -> bool:
        return self.task is not None and not self.task.done()


class CacheOff(Fault):
    name = "cache_off"

    async def inject(self) -> None:
        self.shop.cache.enabled = False
        self.shop.cache.clear()

    async def clear(self) -> None:
        if not self.shop.cache.enabled:
            await self.shop.enable_cache()

    def effective(self) -> bool:
        return not self.shop.cache.enabled


class UpstreamDown(Fault):
    name = "upstream_down"

    def __init__(self, shop: Shop, payments: PaymentsService) -> None:
        super().__init__(shop)
        self.payments = payments

    async def inject(self) -> None:
        await self.payments.stop()

    async def clear(self) -> None:
        await self.payments.start()

    def effective(self) -> bool:
        return not self.payments.running


class Chaos:
    def __init__(self, shop: Shop, payments: PaymentsService) -> None:
        faults: list[Fault] = [PoolExhaustion(shop), SlowDependency(shop), BadConfig(shop),
                               MemoryLeak(shop), CacheOff(shop), LogFlood(shop),
                               UpstreamDown(shop, payments)]
        self.faults = {f.name: f for f in faults}
        self.injected: dict[str, float] = {}
        # Built here, before the service serves anything, so its action tally misses none.
        self.oracle = ShopOracle(shop, payments)

    async def inject(self, name: str) -> None:
        await self.faults[name].inject()
        self.injected[name] = time.time()

    async def clear(self, name: str) -> None:
        await self.faults[name].clear()
        self.injected.pop(name, None)

    async def clear_all(self) -> None:
        for name in list(self.faults):
            with contextlib.suppress(Exception):
                await self.faults[name].clear()
        self.injected.clear()

    def listing(self) -> dict[str, dict[str, object]]:
        return {name: {"injected_at": ts, "effective": self.faults[name].effective()}
                for name, ts in self.injected.items()}


def make_chaos_app(chaos: Chaos) -> web.Application:
    """The chaos port (subjects/chaoshttp.py): inject and clear answer with the active faults;
    `GET /oracle` judges the shop from its own objects (subjects/webshop/oracle.py)."""
    app = chaos_app(chaos)
    oracle = chaos.oracle
    add_oracle(app, oracle.checks, oracle.effects)

    async def watch(_: web.Application) -> None:
        oracle.pool_watch.start()

    async def unwatch(_: web.Application) -> None:
        await oracle.pool_watch.stop()

    app.on_startup.append(watch)
    app.on_cleanup.append(unwatch)
    return app
