"""Runbook rules for the webshop (the condition syntax is subjects.rules').

A rule applies when its invariant broke and every `when` condition holds on
the observation's metrics (and every `log_contains` needle is in a recent log
line). Specific rules carry a higher confidence than the fallbacks, and the
rules of one invariant exclude each other on pool_utilization,
cache_hit_ratio and upstream_error_rate, so the evidence picks one cause.
"""

from __future__ import annotations

from bus_schemas.messages import RecommendedAction as Do
from subjects.base import RunbookRule

RUNBOOKS: tuple[RunbookRule, ...] = (
    RunbookRule(
        name="pool_leak", invariant=None, when={"pool_utilization": ">=0.9"},
        hypothesis="Database connections are checked out and never returned (a connection "
                   "leak): the pool is exhausted and requests time out waiting (503s, latency).",
        confidence=0.85,
        actions=[
            Do(action="recycle_pool", rationale="closes every connection, leaked ones "
               "included, and reopens a fresh pool"),
            Do(action="scale_pool", params={"size": 32}, rationale="more headroom while "
               "the leak is found; does not stop a leak"),
        ],
    ),
    RunbookRule(
        name="slow_dependency", invariant="latency_p99",
        when={"db_p99_ms": ">300", "cache_hit_ratio": ">0.5", "pool_utilization": "<0.9"},
        hypothesis="The active catalog database replica answers slowly; requests wait on it "
                   "although the cache and the pool are healthy.",
        confidence=0.8,
        actions=[
            Do(action="failover_dependency", rationale="switch to the other replica"),
            Do(action="recycle_pool", rationale="fresh connections, in case the slowness "
               "is in stale connections"),
        ],
    ),
    RunbookRule(
        name="cache_disabled", invariant="latency_p99",
        when={"cache_hit_ratio": "<0.2", "db_qps": ">5", "pool_utilization": "<0.9"},
        hypothesis="The product cache is off or cold: every request runs the expensive "
                   "catalog query, so database load and latency rise.",
        confidence=0.85,
        actions=[
            Do(action="enable_cache", rationale="enable and warm the cache"),
            Do(action="restart_worker", rationale="a fresh worker rewarms its cache"),
        ],
    ),
    RunbookRule(
        name="bad_config_errors", invariant="error_rate",
        when={"upstream_error_rate": "<0.5", "pool_utilization": "<0.9"},
        log_contains=["ConfigError"],
        hypothesis="The deployed config is bad: requests fail with 500 on a config error "
                   "while the pool and the payments upstream are healthy.",
        confidence=0.9,
        actions=[
            Do(action="rollback_config", params={"version": "last_good"},
               rationale="return to the last known good config"),
            Do(action="restart_worker", rationale="in case the worker holds a broken state"),
        ],
    ),
    RunbookRule(
        name="recent_deploy_errors", invariant="error_rate",
        when={"upstream_error_rate": "<0.5", "pool_utilization": "<0.9",
              "config_age_s": "<1800"},
        hypothesis="Requests fail with 500 soon after a config deploy; the deploy is the "
                   "likely cause.",
        confidence=0.6,
        actions=[
            Do(action="rollback_config", params={"version": "last_good"},
               rationale="undo the recent deploy"),
            Do(action="restart_worker", rationale="in case the worker holds a broken state"),
        ],
    ),
    RunbookRule(
        name="upstream_down", invariant="error_rate", when={"upstream_error_rate": ">0.5"},
        hypothesis="The payments upstream fails: checkouts answer 502. No registered action "
                   "restores an upstream service; a human must engage its owners.",
        confidence=0.85, escalate=True,
    ),
    RunbookRule(
        name="memory_leak", invariant="memory",
        hypothesis="The worker keeps allocating memory it never frees (a leak).",
        confidence=0.85,
        actions=[
            Do(action="restart_worker", rationale="a restart frees the worker's memory"),
            Do(action="recycle_pool", rationale="frees connection buffers, if the growth "
               "is there"),
        ],
    ),
    RunbookRule(
        name="log_flood", invariant="log_disk",
        hypothesis="Something writes logs far faster than rotation removes them; the log "
                   "directory fills the disk.",
        confidence=0.85,
        actions=[
            Do(action="rotate_logs", rationale="remove old and runaway log files and "
               "detach runaway writers"),
            Do(action="restart_worker", rationale="stops a runaway writer inside the worker"),
        ],
    ),
    RunbookRule(
        name="latency_unexplained", invariant="latency_p99",
        hypothesis="Latency is high without a clear single cause.",
        confidence=0.3,
        actions=[
            Do(action="failover_dependency", rationale="rule out the database replica"),
            Do(action="enable_cache", rationale="rule out a cold or disabled cache"),
        ],
    ),
    RunbookRule(
        name="errors_unexplained", invariant="error_rate",
        hypothesis="Requests fail without a clear single cause.",
        confidence=0.3,
        actions=[
            Do(action="rollback_config", params={"version": "last_good"},
               rationale="rule out a bad deploy"),
            Do(action="restart_worker", rationale="rule out a broken worker state"),
        ],
    ),
)
