"""The ratelimiter's fault catalog: each chaos hook, the invariant it breaks, its cure.

Beside the chaos hooks (chaos.py) and, like them, never given to an actor: the
demo and the tests read it to know what to inject, what to expect, which
action cures it and which plausible one does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Step = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class FaultSpec:
    name: str  # the chaos hook's name (chaos.Fault.name)
    invariant: str  # the one invariant it breaks
    description: str
    right: Step | None  # None: nothing the crew may do cures it (escalate)
    wrong: tuple[Step, ...] = field(default_factory=tuple)  # plausible, and no cure

    @property
    def fixable(self) -> bool:
        return self.right is not None


AUTO: dict[str, Any] = {"node": "auto"}
ALL: dict[str, Any] = {"node": "all"}

FAULTS: tuple[FaultSpec, ...] = (
    FaultSpec("node_killed", "node_down", "a limiter node SIGKILLed",
              ("restart_node", AUTO), (("reconnect_node", ALL),)),
    FaultSpec("redis_link_cut", "redis_disconnected",
              "a node's config points at a port nobody listens on",
              ("reconnect_node", AUTO), (("restart_node", ALL),)),
    FaultSpec("redis_slow", "high_latency", "DEBUG SLEEP bursts on the primary",
              ("failover_redis", {}), (("restart_node", ALL),)),
    FaultSpec("counters_without_ttl", "over_limit",
              "a window counter written far above its limit and without TTL",
              ("repair_counters", {"pattern": "rl:w:*", "reset": True}),
              (("set_limit", {"client": "scraper", "limit": 1000}),)),
    FaultSpec("bad_build", "ghost_allowing", "a node deployed on a build that never denies",
              ("rollback_build", AUTO), (("restart_node", ALL),)),
    FaultSpec("local_store", "counter_drift",
              "a node counting in its own memory instead of Redis",
              ("reconnect_node", AUTO),
              (("repair_counters", {"pattern": "rl:w:*", "reset": True}),)),
    FaultSpec("primary_killed", "redis_disconnected", "the Redis primary SIGKILLed",
              ("failover_redis", {}), (("reconnect_node", ALL),)),
    FaultSpec("data_corrupted", "redis_disconnected",
              "both dumps corrupted, both servers restarted: neither loads",
              None, (("failover_redis", {}), ("reconnect_node", ALL), ("restart_node", ALL),
                     ("repair_counters", {}))),
)
