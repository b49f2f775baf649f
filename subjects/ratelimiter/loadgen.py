"""Clients with known rates, spread over the nodes round robin as a plain load balancer would."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Callable, Sequence

import aiohttp

from subjects.ratelimiter.options import ClientOptions

MAX_IN_FLIGHT = 64
REQUEST_TIMEOUT_S = 2.0


async def _client(session: aiohttp.ClientSession, name: str, rps: float,
                  urls: Callable[[], Sequence[str]], rng: random.Random) -> None:
    loop = asyncio.get_running_loop()
    turn = itertools.count(rng.randrange(1000))
    inflight: set[asyncio.Task[None]] = set()

    async def one(url: str) -> None:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(f"{url}/check", params={"client": name}) as resp:
                await resp.read()

    due = loop.time()
    try:
        while True:
            # Jittered arrivals: no lock-step between clients, the same mean rate.
            due = max(due + rng.uniform(0.5, 1.5) / rps, loop.time() - 1.0)
            await asyncio.sleep(max(0.0, due - loop.time()))
            targets = urls()
            if not targets or len(inflight) >= MAX_IN_FLIGHT:
                continue
            task = loop.create_task(one(targets[next(turn) % len(targets)]))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
    finally:
        for task in inflight:
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)


async def run_load(clients: dict[str, ClientOptions], urls: Callable[[], Sequence[str]],
                   seed: int | None = None) -> None:
    """Each client sends ~rps requests per second until cancelled."""
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=256)) as session:
        await asyncio.gather(*(_client(session, name, c.rps, urls, random.Random(rng.random()))
                               for name, c in clients.items() if c.rps > 0))
