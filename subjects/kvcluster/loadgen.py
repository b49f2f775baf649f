"""The load generator: real puts and gets through the JSON gateway, with its own /metrics.

Like etcd's own client it spreads requests over the members and moves to the
next endpoint when one does not answer. Every put's latency is observed as the
client saw it (a timeout counts at its full length), so the observer's put p99
is what a user of the cluster would feel.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from subjects.kvcluster.gateway import EtcdError, Gateway

REQUEST_TIMEOUT_S = 2.0
KEYS = 100
BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


class LoadMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("kvload_requests", "Requests sent, by operation and outcome",
                                ["op", "outcome"], registry=registry)
        self.put = Histogram("kvload_put_duration_seconds", "Put latency as the client saw it",
                             buckets=BUCKETS, registry=registry)
        self.get = Histogram("kvload_get_duration_seconds", "Get latency as the client saw it",
                             buckets=BUCKETS, registry=registry)


def outcome_of(exc: EtcdError) -> str:
    text = str(exc)
    if "database space exceeded" in text:
        return "nospace"
    if "no answer" in text:
        return "timeout" if "Timeout" in text else "unreachable"
    return "error"


async def _one(gw: Gateway, urls: list[str], start: int, op: str, key: str,
               metrics: LoadMetrics, rng: random.Random) -> None:
    began = time.monotonic()
    outcome = "ok"
    for url in itertools.islice(itertools.cycle(urls), start, start + len(urls)):
        try:
            if op == "put":
                await gw.put(url, key, rng.randbytes(rng.randint(32, 160)), REQUEST_TIMEOUT_S)
            else:
                await gw.get(url, key, REQUEST_TIMEOUT_S)
            outcome = "ok"
            break
        except EtcdError as exc:
            outcome = outcome_of(exc)
            if outcome not in ("unreachable",):
                break  # an answer (or a hang): the client does not hammer the others
    metrics.requests.labels(op, outcome).inc()
    (metrics.put if op == "put" else metrics.get).observe(time.monotonic() - began)


async def run_load(urls: list[str], rps: float, metrics: LoadMetrics,
                   seed: int | None = None) -> None:
    """~`rps` operations per second (half puts, half gets) until cancelled."""
    rng = random.Random(seed)
    gw = Gateway(REQUEST_TIMEOUT_S)
    loop = asyncio.get_running_loop()
    inflight: set[asyncio.Task[None]] = set()
    try:
        due = loop.time()
        for n in itertools.count():
            due = max(due + 1.0 / rps, loop.time() - 1.0)
            await asyncio.sleep(max(0.0, due - loop.time()))
            if len(inflight) >= 64:
                continue
            op = "put" if n % 2 == 0 else "get"
            task = loop.create_task(_one(gw, urls, n % len(urls), op,
                                         f"load/{rng.randrange(KEYS)}", metrics, rng))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
    finally:
        for task in inflight:
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
        await gw.close()


def serve_load(urls: list[str], rps: float, host: str, port: int) -> None:
    """Run the load until killed, its metrics on http://host:port/metrics."""
    registry = CollectorRegistry()
    metrics = LoadMetrics(registry)
    start_http_server(port, addr=host, registry=registry)
    asyncio.run(run_load(urls, rps, metrics))
