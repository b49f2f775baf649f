"""The ratelimiter observer: the manager's inventory, each node's /metrics and /health,
and Redis's own answers (INFO, CLIENT LIST, the counters themselves).

Nothing here takes a node's word about its own correctness. `ghost_ratio`
sums what the nodes allowed per client over the last few seconds and divides
it by the client's limit as Redis holds it; `counter_drift` compares the same
sum with what Redis recorded (its tally); `redis_disconnected_nodes` counts
live nodes that have no connection in the primary's CLIENT LIST;
`over_limit_keys` counts window counters above their limit with no TTL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from subjects import promtext
from subjects.logtail import LogTail, pick
from subjects.ratelimiter import keys

SCRAPE_TIMEOUT_S = 0.8
HISTORY_S = 3.0  # ghost_ratio and counter_drift are judged over about this long
DRIFT_FLOOR = 20.0  # allowed requests: below this much traffic, a difference is noise
MAX_BODY = 1024 * 1024
MIB = 1024 * 1024
T = TypeVar("T")


def _positive_delta(now: float, before: float | None) -> float:
    """A counter's increase; a restart (reset to zero) counts from zero."""
    if before is None:
        return 0.0
    return now - before if now >= before else now


def _tally_delta(now: float, before: float | None) -> float:
    # A failover can lose the last few replicated increments (a small step back: nothing
    # new); a fresh Redis starts from zero (a big step back: count from zero).
    if before is None or now >= before:
        return 0.0 if before is None else now - before
    return now if now < before / 2 else 0.0


async def _maybe(aw: Awaitable[T]) -> T | None:
    try:
        return await asyncio.wait_for(aw, SCRAPE_TIMEOUT_S)
    except (RedisError, OSError, TimeoutError, aiohttp.ClientError, ValueError, KeyError):
        return None


class RatelimiterObserver:
    def __init__(self, url: str, log_file: Path | None) -> None:
        self.url = url.rstrip("/")
        self.log_dir = log_file.parent if log_file else None
        self.tails: dict[Path, LogTail] = {}
        if log_file:
            self.tails[log_file] = LogTail(log_file)
        self._session: aiohttp.ClientSession | None = None
        self._redis: dict[int, aioredis.Redis] = {}
        self._node_prev: dict[str, promtext.Samples] = {}
        self._tally_prev: dict[str, float] = {}
        # Monotonic per client: allowed summed over the nodes, and what Redis's tally recorded.
        self._allowed: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._recorded: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._history: collections.deque[tuple[float, dict[str, float], dict[str, float]]] = (
            collections.deque(maxlen=32))

    # -- I/O ----------------------------------------------------------------------------

    async def _get(self, url: str, path: str) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S))
        async with self._session.get(f"{url}{path}") as resp:
            body = await resp.content.read(MAX_BODY)
            if resp.status != 200:
                raise aiohttp.ClientError(f"{path}: HTTP {resp.status}")
            return body.decode("utf-8", "replace")

    def _r(self, port: int) -> aioredis.Redis:
        if port not in self._redis:
            self._redis[port] = aioredis.Redis(
                host="127.0.0.1", port=port, socket_timeout=SCRAPE_TIMEOUT_S,
                socket_connect_timeout=0.3, retry=Retry(NoBackoff(), 0))
        return self._redis[port]

    async def _node(self, url: str) -> tuple[dict[str, Any], promtext.Samples] | None:
        health, text = await asyncio.gather(self._get(url, "/health"), self._get(url, "/metrics"))
        return json.loads(health), promtext.parse(text)

    async def _primary(self, port: int) -> dict[str, Any]:
        r = self._r(port)
        started = time.perf_counter()
        await r.ping()
        ping_ms = 1000 * (time.perf_counter() - started)
        info = await r.info()
        clients = await r.client_list()
        limits = {keys.text(k): float(v) for k, v in (await r.hgetall(keys.LIMITS)).items()}
        tally = {keys.text(k): float(v) for k, v in (await r.hgetall(keys.TALLY)).items()}
        counters = {n: (float(pttl), float(count))
                    for n, (pttl, count) in (await keys.window_counters(r)).items()}
        return {"ping_ms": ping_ms, "info": info, "clients": clients, "limits": limits,
                "tally": tally, "counters": counters}

    async def _replica(self, port: int) -> dict[str, Any]:
        return dict(await self._r(port).info("replication"))

    def _logs(self) -> list[str]:
        if self.log_dir is not None:
            for path in sorted(self.log_dir.glob("node-*.log")):
                self.tails.setdefault(path, LogTail(path))
        lines: list[str] = []
        for tail in self.tails.values():
            lines += tail.read_new()
        return pick(lines)

    async def scrape(self) -> dict[str, Any]:
        log_lines = await asyncio.to_thread(self._logs)
        try:
            topo = json.loads(await asyncio.wait_for(self._get(self.url, "/topology"),
                                                     SCRAPE_TIMEOUT_S))
            nodes = {n["id"]: n["url"] for n in topo["nodes"]}
            primary, replica = topo["redis"]["primary"], topo["redis"]["replica"]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            return {"up": False, "metrics": {}, "log_lines": log_lines,
                    "error": f"{self.url} did not answer: {type(exc).__name__}: {exc}"[:500]}
        loop = asyncio.get_running_loop()
        p_task = loop.create_task(_maybe(self._primary(int(primary["port"]))))
        r_task = loop.create_task(_maybe(self._replica(int(replica["port"]))))
        node_obs = await asyncio.gather(*(_maybe(self._node(u)) for u in nodes.values()))
        primary_obs, replica_obs = await p_task, await r_task
        metrics = self._metrics(dict(zip(nodes, node_obs, strict=True)), primary_obs,
                                replica_obs, float(topo["window_s"]), time.monotonic())
        return {"up": True, "metrics": metrics, "log_lines": log_lines, "error": ""}

    # -- maths --------------------------------------------------------------------------

    def _metrics(self, nodes: dict[str, tuple[dict[str, Any], promtext.Samples] | None],
                 primary: dict[str, Any] | None, replica: dict[str, Any] | None,
                 window_s: float, now: float) -> dict[str, float]:
        live = {n: obs for n, obs in nodes.items() if obs is not None}
        m: dict[str, float] = {
            "nodes_total": float(len(nodes)),
            "nodes_down": float(len(nodes) - len(live)),
            "redis_primary_up": float(primary is not None),
            "redis_replica_up": float(replica is not None),
            "redis_replica_link_up": float(
                replica is not None and replica.get("master_link_status") == "up"),
            "builds_running": float(len({h["build"] for h, _ in live.values()})),
            "nodes_local_store": float(sum(h["store"] != "redis" for h, _ in live.values())),
        }
        m.update(self._traffic(live))
        if primary is None:
            m["redis_disconnected_nodes"] = float(len(live))
            return m
        names = {c.get("name", "") for c in primary["clients"]}
        m["redis_disconnected_nodes"] = float(
            sum(keys.connection_name(n) not in names for n in live))
        info = primary["info"]
        m.update({
            "redis_ping_ms": primary["ping_ms"],
            "redis_ops_per_s": float(info.get("instantaneous_ops_per_sec", 0)),
            "redis_connected_clients": float(info.get("connected_clients", 0)),
            "redis_used_memory_mb": float(info.get("used_memory", 0)) / MIB,
            "redis_primary_is_master": float(info.get("role") == "master"),
        })
        limits = primary["limits"]
        no_ttl = [(key, count) for key, (pttl, count) in primary["counters"].items()
                  if pttl == -1]
        m["counters_without_ttl"] = float(len(no_ttl))
        m["over_limit_keys"] = float(sum(
            count > limits.get(keys.client_of(key), 0.0) for key, count in no_ttl))
        m.update(self._cross_check(live, primary["tally"], limits, window_s, now))
        return m

    def _traffic(self, live: dict[str, tuple[dict[str, Any], promtext.Samples]],
                 ) -> dict[str, float]:
        """Interval rates and latency over every live node (counter deltas since last scrape)."""
        requests = errors = 0.0
        now_buckets: dict[float, float] = {}
        before_buckets: dict[float, float] = {}
        for node, (_, cur) in live.items():
            prev = self._node_prev.get(node)
            for (name, labels), value in cur.items():
                if name != "ratelimiter_decisions_total":
                    continue
                before = None if prev is None else prev.get((name, labels))
                d = _positive_delta(value, before if before is not None or prev is None
                                    else 0.0)
                lab = dict(labels)
                requests += d
                errors += d if lab.get("decision") == "error" else 0.0
                if lab.get("decision") == "allowed":
                    self._allowed[lab.get("client", "")] += d
            hist = "ratelimiter_request_duration_seconds"
            nb = promtext.buckets(cur, hist)
            pb = promtext.buckets(prev, hist) if prev is not None else nb
            if any(nb.get(le, 0.0) < c for le, c in pb.items()):
                pb = {}  # restarted: its whole histogram is new
            for le, c in nb.items():
                now_buckets[le] = now_buckets.get(le, 0.0) + c
                before_buckets[le] = before_buckets.get(le, 0.0) + pb.get(le, 0.0)
            self._node_prev[node] = cur
        deltas = promtext.bucket_deltas(now_buckets, before_buckets)
        return {"requests": requests,
                "error_rate": errors / requests if requests else 0.0,
                "p50_ms": 1000 * promtext.quantile(0.5, deltas),
                "p99_ms": 1000 * promtext.quantile(0.99, deltas)}

    def _cross_check(self, live: dict[str, Any], tally: dict[str, float],
                     limits: dict[str, float], window_s: float, now: float) -> dict[str, float]:
        for client, value in tally.items():
            self._recorded[client] += _tally_delta(value, self._tally_prev.get(client))
        self._tally_prev = dict(tally)
        self._history.append((now, dict(self._allowed), dict(self._recorded)))
        old = [h for h in self._history if h[0] >= now - HISTORY_S - 0.5]
        if len(old) < 2 or now - old[0][0] < 0.5:
            return {}  # no interval yet: no information, rather than a zero
        t0, allowed0, recorded0 = old[0]
        span = now - t0
        allowed = {c: v - allowed0.get(c, 0.0) for c, v in self._allowed.items()}
        recorded = {c: v - recorded0.get(c, 0.0) for c, v in self._recorded.items()}
        total_a, total_r = sum(allowed.values()), sum(recorded.values())
        ratios = [allowed.get(c, 0.0) / span / (limit / window_s)
                  for c, limit in limits.items() if limit > 0]
        return {
            "allowed_per_s": total_a / span,
            "ghost_ratio": max(ratios, default=0.0),
            "counter_drift": abs(total_a - total_r) / max(total_a, total_r, DRIFT_FLOOR),
        }

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        for r in self._redis.values():
            with contextlib.suppress(RedisError, OSError):
                await r.aclose()
        self._redis.clear()
