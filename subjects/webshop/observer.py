"""The webshop observer: one scrape of /metrics, /health and the log file.

Rates, ratios and latency quantiles are computed over the interval since the
previous scrape (counter and histogram-bucket deltas), so they describe what
the service is doing now, not its lifetime. Each is 0 when nothing happened
in the interval (and on the first scrape, which has no interval).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from subjects import promtext
from subjects.logtail import LogTail

SCRAPE_TIMEOUT_S = 0.8
MIB = 1024 * 1024
MAX_BODY = 1024 * 1024


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


class WebshopObserver:
    def __init__(self, url: str, log_file: Path | None, timeout_s: float = SCRAPE_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.tail = LogTail(log_file)
        self._session: aiohttp.ClientSession | None = None
        self._prev: promtext.Samples | None = None
        self._prev_at = 0.0

    async def _get(self, session: aiohttp.ClientSession, path: str) -> str:
        async with session.get(f"{self.url}{path}") as resp:
            body = await resp.content.read(MAX_BODY)
            if resp.status != 200:
                raise RuntimeError(f"{path}: HTTP {resp.status}")
            return body.decode("utf-8", "replace")

    async def scrape(self) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        log_lines = await asyncio.to_thread(self.tail.read_new)
        try:
            text, _ = await asyncio.gather(self._get(self._session, "/metrics"),
                                           self._get(self._session, "/health"))
            samples = promtext.parse(text)
        except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return {"up": False, "metrics": {}, "log_lines": log_lines,
                    "error": f"{self.url} did not answer: {error}"[:500]}
        now = time.monotonic()
        metrics = self._metrics(samples, self._prev, now - self._prev_at)
        self._prev, self._prev_at = samples, now
        return {"up": True, "metrics": metrics, "log_lines": log_lines, "error": ""}

    def _metrics(self, cur: promtext.Samples, prev: promtext.Samples | None,
                 interval_s: float) -> dict[str, float]:
        def d(name: str, **where: str) -> float:
            before = None if prev is None else promtext.total(prev, name, where)
            return promtext.delta(promtext.total(cur, name, where), before)

        def gauge(name: str) -> float:
            return promtext.total(cur, name)

        def q(name: str, quantile: float) -> float:
            now = promtext.buckets(cur, name)
            before = None if prev is None else promtext.buckets(prev, name)
            return 1000 * promtext.quantile(quantile, promtext.bucket_deltas(now, before))

        requests = d("webshop_http_requests_total")
        errors = sum(d("webshop_http_requests_total", status=status)
                     for status in {dict(labels).get("status", "")
                                    for (n, labels) in cur if n == "webshop_http_requests_total"}
                     if status.startswith("5"))
        hits, misses = (d("webshop_cache_lookups_total", result=r) for r in ("hit", "miss"))
        up_ok, up_err = (d("webshop_upstream_requests_total", outcome=o) for o in ("ok", "error"))
        per_s = 1.0 / interval_s if prev is not None and interval_s > 0 else 0.0
        pool_size = gauge("webshop_db_pool_size")
        pool_in_use = gauge("webshop_db_pool_in_use")
        deployed = gauge("webshop_config_deployed_timestamp_seconds")
        return {
            "rps": requests * per_s,
            "error_rate": _ratio(errors, requests),
            "p50_ms": q("webshop_http_request_duration_seconds", 0.5),
            "p99_ms": q("webshop_http_request_duration_seconds", 0.99),
            "db_p99_ms": q("webshop_dependency_duration_seconds", 0.99),
            "db_qps": d("webshop_db_queries_total") * per_s,
            "pool_size": pool_size,
            "pool_in_use": pool_in_use,
            "pool_waiting": gauge("webshop_db_pool_waiting"),
            "pool_utilization": _ratio(pool_in_use, pool_size),
            "pool_timeouts_per_s": d("webshop_db_pool_acquire_timeouts_total") * per_s,
            "cache_hit_ratio": _ratio(hits, hits + misses),
            "upstream_error_rate": _ratio(up_err, up_ok + up_err),
            # Without it a 0 error rate cannot tell a healthy upstream from no calls at all.
            "upstream_rps": (up_ok + up_err) * per_s,
            "memory_mb": gauge("webshop_process_resident_memory_bytes") / MIB,
            "log_dir_mb": gauge("webshop_log_dir_bytes") / MIB,
            "config_version": gauge("webshop_config_version"),
            "config_age_s": max(0.0, time.time() - deployed) if deployed else 0.0,
            "inflight": gauge("webshop_http_inflight_requests"),
        }

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
