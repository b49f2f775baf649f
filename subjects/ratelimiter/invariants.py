"""What a healthy rate limiter keeps. Healthy values under the built-in load: no node down,
every live node connected to the primary, p99 of a few ms, ghost_ratio about 1.0 on
the clients above their limit, counter_drift near 0, no counter without TTL."""

from __future__ import annotations

from subjects.base import InvariantSpec

INVARIANTS: tuple[InvariantSpec, ...] = (
    InvariantSpec(
        name="node_down", metric="nodes_down", threshold=0.5, for_s=2.0, down_breaks=True,
        description="every limiter node answers /health (and the manager its inventory)",
    ),
    InvariantSpec(
        name="redis_disconnected", metric="redis_disconnected_nodes", threshold=0.5,
        for_s=2.0,
        description="every live node holds a connection to the Redis primary (its CLIENT LIST)",
    ),
    InvariantSpec(
        name="high_latency", metric="p99_ms", threshold=150.0, clear=100.0, for_s=2.0,
        description="p99 of limit checks, over every node, stays below 150 ms",
    ),
    InvariantSpec(
        name="counter_drift", metric="counter_drift", threshold=0.1, clear=0.04, for_s=2.0,
        description="what the nodes allowed and what Redis recorded differ by less than 10%",
    ),
    InvariantSpec(
        name="ghost_allowing", metric="ghost_ratio", threshold=1.5, clear=1.25, for_s=2.0,
        description="no client is allowed more than 1.5x its limit, summed over the nodes",
    ),
    InvariantSpec(
        name="over_limit", metric="over_limit_keys", threshold=0.5, for_s=2.0,
        description="no window counter holds more than its limit without an expiry",
    ),
)
