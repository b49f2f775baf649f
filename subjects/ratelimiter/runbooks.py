"""Runbook rules for the rate limiter (the condition syntax is subjects.rules').

The rules of redis_disconnected exclude each other on redis_primary_up and
redis_replica_up, so the evidence picks one cause: a node's own link, a dead
primary (fail over), or both servers gone (a human restores the data).
"""

from __future__ import annotations

from bus_schemas.messages import RecommendedAction as Do
from subjects.base import RunbookRule

AUTO = {"node": "auto"}
RESET = {"pattern": "rl:w:*", "reset": True}

RUNBOOKS: tuple[RunbookRule, ...] = (
    RunbookRule(
        name="node_process_down", invariant="node_down",
        hypothesis="A limiter node process is gone: it does not answer /health and its share "
                   "of the traffic fails.",
        confidence=0.85,
        actions=[Do(action="restart_node", params=AUTO, rationale="start the nodes that do "
                    "not answer"),
                 Do(action="reconnect_node", params=AUTO, rationale="in case it hangs on Redis")],
    ),
    RunbookRule(
        name="node_redis_link", invariant="redis_disconnected",
        when={"redis_primary_up": "==1"},
        hypothesis="The primary answers, but a live node holds no connection to it: the node "
                   "is pointed elsewhere or its link broke; its checks fail with 503.",
        confidence=0.85,
        actions=[Do(action="reconnect_node", params=AUTO, rationale="point it at the primary "
                    "and reload"),
                 Do(action="restart_node", params={"node": "all"}, rationale="fresh processes")],
    ),
    RunbookRule(
        name="primary_down", invariant="redis_disconnected",
        when={"redis_primary_up": "==0", "redis_replica_up": "==1"},
        hypothesis="The Redis primary does not answer and its replica does: fail over.",
        confidence=0.9,
        actions=[Do(action="failover_redis", rationale="promote the replica, repoint the "
                    "nodes")],
    ),
    RunbookRule(
        name="redis_data_lost", invariant="redis_disconnected",
        when={"redis_primary_up": "==0", "redis_replica_up": "==0"},
        hypothesis="Neither Redis server answers (both down, e.g. refusing to load a corrupt "
                   "dataset). No registered action restores Redis data: a human must restore "
                   "it from a backup or rebuild it empty.",
        confidence=0.9, escalate=True,
    ),
    RunbookRule(
        name="redis_slow", invariant="high_latency", when={"redis_ping_ms": ">20"},
        hypothesis="The Redis primary itself answers slowly (its PING takes tens of ms): every "
                   "node waits on it.",
        confidence=0.8,
        actions=[Do(action="failover_redis", rationale="move the nodes to the replica"),
                 Do(action="restart_node", params={"node": "all"}, rationale="rule out "
                    "the nodes")],
    ),
    RunbookRule(
        name="latency_unexplained", invariant="high_latency",
        hypothesis="Checks are slow without a clear single cause.",
        confidence=0.3,
        actions=[Do(action="failover_redis", rationale="rule out the primary"),
                 Do(action="restart_node", params={"node": "all"}, rationale="rule out "
                    "the nodes")],
    ),
    RunbookRule(
        name="mixed_builds_ghost", invariant="ghost_allowing", when={"builds_running": ">1"},
        hypothesis="Clients get more than their limit while the nodes run different builds: "
                   "a new build does not enforce the limit.",
        confidence=0.85,
        actions=[Do(action="rollback_build", params=AUTO, rationale="back to the last good "
                    "build"),
                 Do(action="restart_node", params={"node": "all"}, rationale="fresh "
                    "processes")],
    ),
    RunbookRule(
        name="ghost_unexplained", invariant="ghost_allowing",
        hypothesis="Clients get more than their limit without a clear cause.",
        confidence=0.4,
        actions=[Do(action="rollback_build", params=AUTO, rationale="rule out a build"),
                 Do(action="reconnect_node", params=AUTO, rationale="rule out a node "
                    "counting alone")],
    ),
    RunbookRule(
        name="local_store_drift", invariant="counter_drift", when={"nodes_local_store": ">=1"},
        hypothesis="A node counts in its own memory: what it allows never reaches Redis, so "
                   "the nodes and Redis disagree.",
        confidence=0.85,
        actions=[Do(action="reconnect_node", params=AUTO, rationale="back to the shared "
                    "store"),
                 Do(action="restart_node", params={"node": "all"}, rationale="fresh "
                    "processes")],
    ),
    RunbookRule(
        name="drift_unexplained", invariant="counter_drift",
        hypothesis="The nodes and Redis disagree on what was allowed.",
        confidence=0.4,
        actions=[Do(action="reconnect_node", params=AUTO, rationale="rule out a node off "
                    "the shared store"),
                 Do(action="repair_counters", params=RESET, rationale="rule out bad keys")],
    ),
    RunbookRule(
        name="counters_without_expiry", invariant="over_limit",
        hypothesis="Window counters were written without a TTL and above their limit: they "
                   "never expire and lock their clients out.",
        confidence=0.85,
        actions=[Do(action="repair_counters", params=RESET, rationale="delete the stuck "
                    "counters (they rebuild within one window)"),
                 Do(action="repair_counters", params={"pattern": "rl:w:*"},
                    rationale="only give them a TTL")],
    ),
)
