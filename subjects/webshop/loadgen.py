"""A built-in load generator: real HTTP requests to the service over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import random

import aiohttp

from subjects.webshop.db import PRODUCTS, SEARCH_TERMS

MAX_IN_FLIGHT = 128
REQUEST_TIMEOUT_S = 3.0
# (weight, kind): mostly product pages, some searches and listings, a steady trickle
# of checkouts (the only route that reaches the payments upstream).
MIX = ((50, "product"), (20, "search"), (10, "listing"), (20, "checkout"))


async def _one(session: aiohttp.ClientSession, base: str, rng: random.Random) -> None:
    kind = rng.choices([k for _, k in MIX], weights=[w for w, _ in MIX])[0]
    pid = rng.randint(1, PRODUCTS)
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        if kind == "product":
            req = session.get(f"{base}/products/{pid}")
        elif kind == "search":
            req = session.get(f"{base}/search", params={"q": rng.choice(SEARCH_TERMS)})
        elif kind == "listing":
            req = session.get(f"{base}/products")
        else:
            req = session.post(f"{base}/checkout", json={"product_id": pid, "qty": 1})
        async with req as resp:
            await resp.read()


async def run_load(base: str, rps: float, seed: int | None = None) -> None:
    """Send ~`rps` requests per second until cancelled; never more than MAX_IN_FLIGHT."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    interval = 1.0 / rps
    inflight: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)) as session:
        try:
            due = loop.time()
            while True:
                due = max(due + interval, loop.time() - 1.0)  # no burst after a stall
                await asyncio.sleep(max(0.0, due - loop.time()))
                if len(inflight) >= MAX_IN_FLIGHT:
                    continue
                task = loop.create_task(_one(session, base, rng))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
        finally:
            for task in inflight:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
