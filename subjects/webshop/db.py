"""The data layer: SQLite behind a bounded connection pool, reached through a
replicated "catalog" dependency.

Queries run on a small thread pool (sqlite3 blocks). The pool is bounded: when
every connection is checked out, callers wait up to the acquire timeout and
then fail with PoolTimeout (the service answers 503).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

PRODUCTS = 500
REVIEWS = 10_000
CATEGORIES = ("books", "games", "garden", "kitchen", "music", "outdoor", "toys", "tools")
SEARCH_TERMS = ("blue", "classic", "deluxe", "mini", "pro", "red", "smart", "travel")
_ADJECTIVES = ("blue", "red", "classic", "deluxe", "mini", "pro", "smart", "travel", "eco")


class PoolTimeout(Exception):
    pass


@dataclass(eq=False)
class PooledConnection:
    raw: sqlite3.Connection
    generation: int


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=2.0, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def seed(path: Path) -> None:
    """Create and fill the shop's database once; later starts reuse it."""
    conn = _connect(path)
    try:
        conn.executescript(
            """
            CREATE TABLE IF NOT EXISTS products (
                id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL,
                price REAL NOT NULL, stock INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS reviews (
                id INTEGER PRIMARY KEY, product_id INTEGER NOT NULL, stars INTEGER NOT NULL);
            CREATE INDEX IF NOT EXISTS reviews_product ON reviews(product_id);
            CREATE TABLE IF NOT EXISTS orders (
                id INTEGER PRIMARY KEY, product_id INTEGER NOT NULL, qty INTEGER NOT NULL,
                amount REAL NOT NULL, ts REAL NOT NULL);
            """
        )
        if conn.execute("SELECT COUNT(*) FROM products").fetchone()[0]:
            return
        rng = random.Random(7)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO products VALUES (?, ?, ?, ?, ?)",
            [
                (i, f"{rng.choice(_ADJECTIVES)} {rng.choice(CATEGORIES)} item {i}",
                 CATEGORIES[i % len(CATEGORIES)], round(rng.uniform(2, 200), 2), 100)
                for i in range(1, PRODUCTS + 1)
            ],
        )
        conn.executemany(
            "INSERT INTO reviews (product_id, stars) VALUES (?, ?)",
            [(rng.randint(1, PRODUCTS), rng.randint(1, 5)) for _ in range(REVIEWS)],
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


class Pool:
    """A bounded pool of SQLite connections with FIFO waiters."""

    def __init__(self, path: Path, size: int, acquire_timeout_s: float,
                 executor: ThreadPoolExecutor) -> None:
        self.path = path
        self.size = size
        self.acquire_timeout_s = acquire_timeout_s
        self.executor = executor
        self.generation = 0
        self.timeouts = 0
        self._idle: deque[PooledConnection] = deque()
        self._in_use: set[PooledConnection] = set()
        self._open = 0  # connections of the current generation, idle or checked out
        self._waiters: deque[asyncio.Future[PooledConnection]] = deque()
        self._fill()

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def _fill(self) -> None:
        while self._open < self.size:
            self._open += 1
            self._hand_out(PooledConnection(_connect(self.path), self.generation))

    def _hand_out(self, conn: PooledConnection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_use.add(conn)
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _close(self, conn: PooledConnection) -> None:
        with suppress(sqlite3.Error):
            conn.raw.close()

    async def acquire(self, timeout_s: float | None = -1.0, *, priority: bool = False,
                      ) -> PooledConnection:
        """A connection; waits up to `timeout_s` (default: the pool's, None: forever)."""
        if self._idle:
            conn = self._idle.popleft()
            self._in_use.add(conn)
            return conn
        timeout = self.acquire_timeout_s if timeout_s == -1.0 else timeout_s
        waiter: asyncio.Future[PooledConnection] = asyncio.get_running_loop().create_future()
        if priority:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())
            waiter.cancel()
            raise
        if not done:
            waiter.cancel()
            self.timeouts += 1
            raise PoolTimeout(
                f"no database connection within {(timeout or 0) * 1000:.0f} ms "
                f"(pool {self.in_use}/{self.size} in use, {self.waiting} waiting)")
        return waiter.result()

    def release(self, conn: PooledConnection) -> None:
        self._in_use.discard(conn)
        if conn.generation != self.generation:
            self._close(conn)  # from before a recycle
            return
        if self._open > self.size:  # the pool was scaled down
            self._open -= 1
            self._close(conn)
            return
        self._hand_out(conn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[PooledConnection]:
        conn = await self.acquire()
        try:
            yield conn
        finally:
            self.release(conn)

    async def run(self, conn: PooledConnection, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, conn.raw)

    def scale(self, size: int) -> None:
        self.size = size
        while self._open > self.size and self._idle:
            self._open -= 1
            self._close(self._idle.popleft())
        self._fill()

    def recycle(self) -> None:
        """Close every idle connection, retire every checked-out one, open a fresh set."""
        self.generation += 1
        while self._idle:
            self._close(self._idle.popleft())
        self._open = 0
        self._fill()

    def close(self) -> None:
        for conn in (*self._idle, *self._in_use):
            self._close(conn)
        self._idle.clear()
        self._in_use.clear()
        for waiter in self._waiters:
            waiter.cancel()


@dataclass
class Replica:
    name: str
    extra_latency_s: float = 0.0  # network latency to this replica (0 when healthy)


class Catalog:
    """The catalog database, a dependency with two replicas; one is active."""

    def __init__(self, pool: Pool, observe: Callable[[str, float], None]) -> None:
        self.pool = pool
        self.replicas = [Replica("db-a"), Replica("db-b")]
        self.active = 0
        self.queries = 0
        self._observe = observe  # (replica, seconds) -> metrics

    @property
    def replica(self) -> Replica:
        return self.replicas[self.active]

    def failover(self) -> Replica:
        self.active = (self.active + 1) % len(self.replicas)
        return self.replica

    async def query(self, fn: Callable[[sqlite3.Connection], T], *, cost_s: float = 0.0) -> T:
        """Run `fn` on the active replica; `cost_s` models a heavy query's server time."""
        replica = self.replica
        started = time.perf_counter()
        self.queries += 1
        try:
            if replica.extra_latency_s:
                await asyncio.sleep(replica.extra_latency_s)
            async with self.pool.connection() as conn:
                result = await self.pool.run(conn, fn)
            if cost_s:
                await asyncio.sleep(cost_s)
            return result
        finally:
            self._observe(replica.name, time.perf_counter() - started)
