"""One scrape of a `service` subject: its PromQL queries, /metrics, health URL and log.

The sources are asked concurrently, each bounded by `timeout_s`. The subject is up when
every declared source answered; a source that did not answer leaves its metrics out
(an invariant over them sees them missing, not zero) and says why in `error`.
Queries and URLs are config only: nothing observed is ever put into one.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import aiohttp

from bus_schemas.errors import MendersError
from subjects import promtext
from subjects.logtail import LogTail
from subjects.service.options import PromQuery, Reduce, ScrapedMetric, ServiceOptions

MAX_BODY = 4 * 1024 * 1024


class SourceError(MendersError, RuntimeError):
    """A declared source answered, but not with a usable value."""


def reduce(values: list[float], how: Reduce) -> float | None:
    """One number for a vector; None for an empty one (NaNs are dropped first)."""
    values = [v for v in values if not math.isnan(v)]
    if how == "count":
        return float(len(values))
    if not values:
        return None
    if how == "sum":
        return sum(values)
    if how == "avg":
        return sum(values) / len(values)
    return max(values) if how == "max" else min(values)


def query_value(body: Any, query: PromQuery) -> float | None:
    """The reduced value of a Prometheus /api/v1/query reply; SourceError if it failed."""
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error", body) if isinstance(body, dict) else body
        raise SourceError(f"query failed: {str(error)[:200]}")
    data = body.get("data") or {}
    kind, result = data.get("resultType"), data.get("result")
    if not isinstance(result, list):
        raise SourceError(f"unreadable query result: {str(result)[:200]}")
    try:
        if kind == "vector":
            values = [float(series["value"][1]) for series in result]
        elif kind == "scalar":
            values = [float(result[1])]
        else:
            raise SourceError(f"query returned a {kind}, want a vector or scalar")
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise SourceError(f"unreadable query result: {exc!r}") from None
    value = reduce(values, query.reduce)
    return query.empty if value is None else value


class ServiceObserver:
    def __init__(self, options: ServiceOptions, log_file: Path | None) -> None:
        self.options = options
        self.tail = LogTail(log_file)
        self._session: aiohttp.ClientSession | None = None
        self._prev: dict[str, float] = {}  # counter totals, for `rate` metrics
        self._prev_at = 0.0

    async def scrape(self) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.options.timeout_s))
        session, opts = self._session, self.options
        jobs: dict[str, Any] = {f"query {name}": self._query(session, q)
                                for name, q in opts.queries.items()}
        if opts.metrics:
            jobs["metrics_url"] = self._get(session, opts.metrics_url)
        if opts.health_url:
            jobs["health_url"] = self._health(session)
        # A thread hop per scrape was 40 % of the monitor's CPU at 1,500 subjects
        # (bench/scale.py): only a subject with a log file pays for one.
        logs = asyncio.to_thread(self.tail.read_new) if self.tail.path else _no_lines()
        log_lines, *results = await asyncio.gather(logs, *jobs.values(),
                                                   return_exceptions=True)
        metrics: dict[str, float] = {}
        errors: list[str] = []
        for (source, job), result in zip(jobs.items(), results, strict=True):
            del job
            if isinstance(result, BaseException):
                errors.append(f"{source}: {_describe(result)}")
                if source == "health_url":
                    metrics["health_ok"] = 0.0  # an invariant on it breaks; latency unknown
            elif source == "metrics_url":
                metrics.update(self._picked(result))
            elif source == "health_url":
                metrics.update(result)
            elif result is not None:
                metrics[source.removeprefix("query ")] = result
        lines = log_lines if isinstance(log_lines, list) else []
        return {"up": not errors, "metrics": metrics, "log_lines": lines,
                "error": "; ".join(errors)[:500]}

    async def _query(self, session: aiohttp.ClientSession, query: PromQuery) -> float | None:
        url = f"{self.options.prometheus_url.rstrip('/')}/api/v1/query"
        async with session.get(url, params={"query": query.promql}) as resp:
            if resp.status not in (200, 400, 422):  # 400/422 carry Prometheus's own error
                raise SourceError(f"HTTP {resp.status}")
            return query_value(await resp.json(content_type=None), query)

    async def _get(self, session: aiohttp.ClientSession, url: str) -> str:
        async with session.get(url) as resp:
            body = await resp.content.read(MAX_BODY)
            if resp.status != 200:
                raise SourceError(f"HTTP {resp.status}")
            return body.decode("utf-8", "replace")

    async def _health(self, session: aiohttp.ClientSession) -> dict[str, float]:
        started = time.monotonic()
        async with session.get(self.options.health_url) as resp:
            await resp.content.read(MAX_BODY)
            ms = 1000 * (time.monotonic() - started)
            if resp.status not in self.options.health_status:
                raise SourceError(f"HTTP {resp.status}, want {self.options.health_status}")
        return {"health_ok": 1.0, "health_ms": ms}

    def _picked(self, text: str) -> dict[str, float]:
        samples = promtext.parse(text)
        now = time.monotonic()
        interval = now - self._prev_at if self._prev_at else 0.0
        out: dict[str, float] = {}
        for name, pick in self.options.metrics.items():
            value = _pick(samples, pick)
            if value is None:
                continue
            if pick.rate:
                before = self._prev.get(name)
                self._prev[name] = value
                value = promtext.delta(value, before) / interval if interval > 0 else 0.0
            out[name] = value
        self._prev_at = now
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _no_lines() -> list[str]:
    return []


def _pick(samples: promtext.Samples, pick: ScrapedMetric) -> float | None:
    values = [v for (n, labels), v in samples.items() if n == pick.name
              and all(kv in labels for kv in pick.labels.items())]
    return reduce(values, pick.reduce)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "no answer in time"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
