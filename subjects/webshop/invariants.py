"""What a healthy webshop keeps. Thresholds sit well clear of healthy values under
the built-in load (p99 ~5-30 ms, no 5xx, pool use <= 3/8, RSS ~45-70 MiB, logs
< 15 MiB) and are crossed within ~3 s of any fault at a 1 s scrape."""

from __future__ import annotations

from subjects.base import InvariantSpec

INVARIANTS: tuple[InvariantSpec, ...] = (
    InvariantSpec(
        name="latency_p99", metric="p99_ms", threshold=250.0, clear=200.0, for_s=2.0,
        description="p99 latency of served requests stays below 250 ms",
    ),
    InvariantSpec(
        name="error_rate", metric="error_rate", threshold=0.05, clear=0.02, for_s=2.0,
        down_breaks=True,
        description="fewer than 5% of served requests fail with a 5xx; the service answers",
    ),
    InvariantSpec(
        name="pool_saturation", metric="pool_utilization", threshold=0.9, clear=0.6,
        for_s=2.0,
        description="fewer than 90% of database connections are checked out",
    ),
    InvariantSpec(
        name="memory", metric="memory_mb", threshold=120.0, clear=90.0, for_s=2.0,
        description="resident memory stays below 120 MiB",
    ),
    InvariantSpec(
        name="log_disk", metric="log_dir_mb", threshold=30.0, clear=20.0, for_s=2.0,
        description="the log directory holds less than 30 MiB",
    ),
)
