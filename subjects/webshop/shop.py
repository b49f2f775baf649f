"""The shop's state and business logic, and the remedies its action endpoints run."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import random
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from subjects.base import ActionError
from subjects.webshop import db
from subjects.webshop.actions import CONFIG_VERSIONS, MAX_POOL_SIZE, MIN_POOL_SIZE
from subjects.webshop.jsonlog import LOG_NAME, JsonLog, dir_bytes
from subjects.webshop.shop_metrics import ShopMetrics

POOL_SIZE = 8
POOL_ACQUIRE_TIMEOUT_S = 0.5
EXPENSIVE_QUERY_COST_S = 0.3  # server time of the uncached aggregate on a shared database
CACHE_REFRESH_S = 15.0
UPSTREAM_TIMEOUT_S = 1.0
LISTING_SIZE = 50
SLOW_QUERY_LOG_S = 0.25


class ConfigError(Exception):
    pass


class UpstreamError(Exception):
    pass


@dataclass(frozen=True)
class ShopConfig:
    version: str
    number: int
    # v2 ships a pricing rule that references a key it never defines.
    failing_fraction: float = 0.0


CONFIGS = {"v1": ShopConfig("v1", 1), "v2": ShopConfig("v2", 2, failing_fraction=0.4)}


class ConfigStore:
    def __init__(self) -> None:
        self.active = CONFIGS["v1"]
        self.last_good = "v1"
        self.deployed_at = time.time()
        self._rng = random.Random()

    def deploy(self, version: str) -> ShopConfig:
        if version == "last_good":
            version = self.last_good
        if version not in CONFIGS:
            raise ActionError(f"unknown config version {version!r}; known: "
                              + ", ".join(CONFIG_VERSIONS))
        self.active = CONFIGS[version]
        self.deployed_at = time.time()
        return self.active

    def apply_pricing(self) -> None:
        cfg = self.active
        if cfg.failing_fraction and self._rng.random() < cfg.failing_fraction:
            raise ConfigError(f"config {cfg.version}: pricing rule 'surge' references "
                              "undefined key 'pricing.surge_multiplier'")


class ProductCache:
    """Refresh-ahead cache of product details and search results."""

    def __init__(self) -> None:
        self.enabled = True
        self.details: dict[int, dict[str, Any]] = {}
        self.searches: dict[str, list[int]] = {}

    def clear(self) -> None:
        self.details = {}
        self.searches = {}


class Worker:
    """What a worker restart resets: its allocations, its tasks, its in-flight requests."""

    def __init__(self) -> None:
        self.held: list[bytearray] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.inflight: set[asyncio.Task[Any]] = set()
        self.dropped: set[asyncio.Task[Any]] = set()
        self.restarts = 0

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def held_bytes(self) -> int:
        return sum(len(b) for b in self.held)

    def free(self) -> None:
        self.held.clear()
        gc.collect()
        trim_heap()

    async def restart(self) -> int:
        """Stop the worker's tasks, drop in-flight requests, free memory; returns dropped count."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        current = asyncio.current_task()
        dropped = [t for t in self.inflight if t is not current and not t.done()]
        for task in dropped:
            self.dropped.add(task)
            task.cancel()
        self.free()
        self.restarts += 1
        return len(dropped)


def trim_heap() -> None:
    """Hand freed heap pages back to the OS so RSS really falls (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class LogDir:
    """The log directory: the app log plus any extra writers attached to it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log = JsonLog(directory)
        self.writers: set[asyncio.Task[None]] = set()

    def attach(self, task: asyncio.Task[None]) -> None:
        self.writers.add(task)
        task.add_done_callback(self.writers.discard)

    def size_bytes(self) -> int:
        return dir_bytes(self.directory)

    async def rotate(self) -> tuple[int, int]:
        """Detach extra writers and delete everything but the live log: (files, bytes)."""
        writers = list(self.writers)
        for task in writers:
            task.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        return await asyncio.to_thread(self._delete_old)

    def _delete_old(self) -> tuple[int, int]:
        files = freed = 0
        for path in self.directory.iterdir():
            if path.name == LOG_NAME or not path.is_file():
                continue
            with contextlib.suppress(OSError):
                size = path.stat().st_size
                path.unlink()
                files += 1
                freed += size
        return files, freed


def _aggregate_sql(where: str) -> str:
    return ("SELECT p.id, p.name, p.category, p.price, COUNT(r.id), "
            "COALESCE(ROUND(AVG(r.stars), 2), 0) FROM products p "
            f"LEFT JOIN reviews r ON r.product_id = p.id {where} GROUP BY p.id ORDER BY p.id")


def _detail(row: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": row[0], "name": row[1], "category": row[2], "price": row[3],
            "reviews": row[4], "rating": row[5]}


class Shop:
    def __init__(self, data_dir: Path, payments_url: str, metrics: ShopMetrics) -> None:
        self.data_dir = data_dir
        self.payments_url = payments_url
        self.metrics = metrics
        self.logs = LogDir(data_dir / "logs")
        self.db_path = data_dir / "shop.db"
        db.seed(self.db_path)
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sqlite")
        self.pool = db.Pool(self.db_path, POOL_SIZE, POOL_ACQUIRE_TIMEOUT_S, self.executor)
        self.catalog = db.Catalog(self.pool, self._observe_dependency)
        self.cache = ProductCache()
        self.config = ConfigStore()
        self.worker = Worker()
        self.started_at = time.time()
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._bind_metrics()

    def _observe_dependency(self, replica: str, seconds: float) -> None:
        self.metrics.dependency.labels(replica).observe(seconds)
        self.metrics.db_queries.inc()
        if seconds >= SLOW_QUERY_LOG_S:
            self.logs.log.write("warn", "slow catalog query", replica=replica,
                                latency_ms=round(seconds * 1000, 1))

    def _bind_metrics(self) -> None:
        m = self.metrics
        m.bind("pool_size", lambda: float(self.pool.size))
        m.bind("pool_in_use", lambda: float(self.pool.in_use))
        m.bind("pool_waiting", lambda: float(self.pool.waiting))
        m.bind("log_dir", lambda: float(self.logs.size_bytes()))
        m.bind("config_version", lambda: float(self.config.active.number))
        m.bind("config_deployed", lambda: self.config.deployed_at)
        m.bind("replica", lambda: float(self.catalog.active))

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT_S))
        await self.warm_cache()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self.pool.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.logs.log.close()

    # --- cache ----------------------------------------------------------------

    async def warm_cache(self) -> None:
        """One batch query fills the whole cache (refresh-ahead)."""
        if not self.cache.enabled:
            return

        def load(conn: sqlite3.Connection) -> tuple[list[Any], dict[str, list[int]]]:
            rows = conn.execute(_aggregate_sql("")).fetchall()
            searches = {
                term: [r[0] for r in conn.execute(
                    "SELECT id FROM products WHERE name LIKE ? ORDER BY id LIMIT 20",
                    (f"%{term}%",))]
                for term in db.SEARCH_TERMS
            }
            return rows, searches

        rows, searches = await self.catalog.query(load)
        if self.cache.enabled:
            self.cache.details = {row[0]: _detail(row) for row in rows}
            self.cache.searches = searches

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(CACHE_REFRESH_S)
            with contextlib.suppress(db.PoolTimeout, sqlite3.Error):
                await self.warm_cache()

    def _cached(self, ids: list[int]) -> list[dict[str, Any]] | None:
        if not self.cache.enabled:
            self.metrics.cache.labels("miss").inc()
            return None
        found = [self.cache.details.get(i) for i in ids]
        if any(d is None for d in found):
            self.metrics.cache.labels("miss").inc()
            return None
        self.metrics.cache.labels("hit").inc()
        return [d for d in found if d is not None]

    # --- business ----------------------------------------------------------------

    async def _details(self, ids: list[int]) -> list[dict[str, Any]]:
        cached = self._cached(ids)
        if cached is None:
            marks = ",".join("?" * len(ids))

            def aggregate(conn: sqlite3.Connection) -> list[Any]:
                return conn.execute(_aggregate_sql(f"WHERE p.id IN ({marks})"), ids).fetchall()

            cached = [_detail(r) for r in
                      await self.catalog.query(aggregate, cost_s=EXPENSIVE_QUERY_COST_S)]
        # Stock is live data and never cached.
        stock = await self._stock(ids)
        return [{**d, "stock": stock.get(d["id"], 0)} for d in cached]

    async def _stock(self, ids: list[int]) -> dict[int, int]:
        marks = ",".join("?" * len(ids))

        def read(conn: sqlite3.Connection) -> dict[int, int]:
            return dict(conn.execute(
                f"SELECT id, stock FROM products WHERE id IN ({marks})", ids).fetchall())

        return await self.catalog.query(read)

    async def product(self, product_id: int) -> dict[str, Any] | None:
        if not 1 <= product_id <= db.PRODUCTS:
            return None
        return (await self._details([product_id]))[0]

    async def listing(self) -> list[dict[str, Any]]:
        return await self._details(list(range(1, LISTING_SIZE + 1)))

    async def search(self, term: str) -> list[dict[str, Any]]:
        term = term[:40]
        ids = self.cache.searches.get(term) if self.cache.enabled else None
        if ids is None:

            def find(conn: sqlite3.Connection) -> list[int]:
                return [r[0] for r in conn.execute(
                    "SELECT id FROM products WHERE name LIKE ? ORDER BY id LIMIT 20",
                    (f"%{term}%",))]

            ids = await self.catalog.query(find)
        return await self._details(ids) if ids else []

    async def checkout(self, product_id: int, qty: int) -> dict[str, Any]:
        def write(conn: sqlite3.Connection) -> tuple[int, float]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Restock a sold-out item so the demo's load never runs dry.
                conn.execute("UPDATE products SET stock = CASE WHEN stock >= ? THEN stock - ? "
                             "ELSE 100 END WHERE id = ?", (qty, qty, product_id))
                price = conn.execute("SELECT price FROM products WHERE id = ?",
                                     (product_id,)).fetchone()[0]
                cur = conn.execute("INSERT INTO orders (product_id, qty, amount, ts) "
                                   "VALUES (?, ?, ?, ?)",
                                   (product_id, qty, price * qty, time.time()))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return int(cur.lastrowid or 0), float(price * qty)

        order_id, amount = await self.catalog.query(write)
        charge = await self._charge(order_id, amount)
        return {"order": order_id, "amount": round(amount, 2), "payment": charge}

    async def _charge(self, order_id: int, amount: float) -> str:
        assert self._session is not None
        try:
            async with self._session.post(f"{self.payments_url}/charge",
                                          json={"order": order_id, "amount": amount}) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise UpstreamError(f"payments: HTTP {resp.status}")
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self.metrics.upstream.labels("error").inc()
            raise UpstreamError(f"payments: {type(exc).__name__}: {exc}"[:300]) from None
        except UpstreamError:
            self.metrics.upstream.labels("error").inc()
            raise
        self.metrics.upstream.labels("ok").inc()
        return str(body.get("charge", ""))

    # --- remedies (the action endpoints) ------------------------------------------

    async def recycle_pool(self) -> str:
        before = self.pool.in_use
        self.pool.recycle()
        await asyncio.sleep(0)  # let waiters (and whatever held old connections) react
        return (f"pool recycled: {before} checked-out connections retired, "
                f"{self.pool.size} fresh connections open")

    async def scale_pool(self, size: int) -> str:
        if not MIN_POOL_SIZE <= size <= MAX_POOL_SIZE:
            raise ActionError(f"scale_pool: size must be {MIN_POOL_SIZE}..{MAX_POOL_SIZE}, "
                              f"got {size}")
        old = self.pool.size
        self.pool.scale(size)
        return f"pool size {old} -> {size}"

    async def failover_dependency(self) -> str:
        old = self.catalog.replica.name
        new = self.catalog.failover().name
        return f"catalog failed over from {old} to {new}"

    async def rollback_config(self, version: str) -> str:
        old = self.config.active.version
        new = self.config.deploy(version).version
        return f"config {old} -> {new}"

    async def restart_worker(self) -> str:
        before = self.worker.held_bytes()
        dropped = await self.worker.restart()
        await self.warm_cache()
        return (f"worker restarted: {dropped} in-flight requests dropped, "
                f"{before / 1e6:.0f} MB of worker allocations freed")

    async def enable_cache(self) -> str:
        was = self.cache.enabled
        self.cache.enabled = True
        await self.warm_cache()
        return "cache enabled and warmed" if not was else "cache already enabled; rewarmed"

    async def rotate_logs(self) -> str:
        files, freed = await self.logs.rotate()
        return f"logs rotated: {files} files removed, {freed / 1e6:.1f} MB freed"
