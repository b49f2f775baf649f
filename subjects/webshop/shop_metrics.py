"""The service's own Prometheus registry: every symptom is measured from real work."""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                   0.75, 1.0, 2.5, 5.0)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> float:
    """Resident set size of this process, from /proc/self/statm."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return float(int(f.read().split()[1]) * _PAGE)
    except (OSError, IndexError, ValueError):
        return 0.0


class ShopMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("webshop_http_requests", "Requests served",
                                ["route", "status"], registry=r)
        self.latency = Histogram("webshop_http_request_duration_seconds",
                                 "Request latency as served", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("webshop_http_inflight_requests", "Requests in progress",
                              registry=r)
        self.dependency = Histogram("webshop_dependency_duration_seconds",
                                    "Catalog database call latency", ["replica"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.db_queries = Counter("webshop_db_queries", "Catalog database calls", registry=r)
        self.cache = Counter("webshop_cache_lookups", "Cache lookups", ["result"], registry=r)
        self.upstream = Counter("webshop_upstream_requests", "Payments calls", ["outcome"],
                                registry=r)
        self.pool_size = Gauge("webshop_db_pool_size", "Pool capacity", registry=r)
        self.pool_in_use = Gauge("webshop_db_pool_in_use", "Checked-out connections",
                                 registry=r)
        self.pool_waiting = Gauge("webshop_db_pool_waiting", "Callers waiting", registry=r)
        self.pool_timeouts = Counter("webshop_db_pool_acquire_timeouts",
                                     "Acquires that timed out", registry=r)
        self.memory = Gauge("webshop_process_resident_memory_bytes", "RSS", registry=r)
        self.memory.set_function(rss_bytes)
        self.log_dir = Gauge("webshop_log_dir_bytes", "Bytes in the log directory", registry=r)
        self.config_version = Gauge("webshop_config_version", "Deployed config version",
                                    registry=r)
        self.config_deployed = Gauge("webshop_config_deployed_timestamp_seconds",
                                     "When the config was deployed", registry=r)
        self.replica = Gauge("webshop_dependency_active_replica", "Active catalog replica",
                             registry=r)
        # Initialise label sets so a fresh service exports zeros, not gaps.
        for result in ("hit", "miss"):
            self.cache.labels(result)
        for outcome in ("ok", "error"):
            self.upstream.labels(outcome)

    def bind(self, name: str, fn: Callable[[], float]) -> None:
        gauge = getattr(self, name)
        assert isinstance(gauge, Gauge)
        gauge.set_function(fn)
