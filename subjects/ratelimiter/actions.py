"""The ratelimiter's registered remediation actions and their typed parameters.

Every parameter is bounded in its schema, so no proposal (an LLM's included)
can name a key outside the counters, a node that is not a node, or a limit
beyond MAX_LIMIT; the manager checks what only it knows (which nodes and
clients exist) before anything runs.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from subjects.base import ActionSpec, NoParams
from subjects.ratelimiter.options import CLIENT_NAME, MAX_LIMIT

# "auto": the nodes the action's own check finds at fault; "all"; or one node.
NODE_SELECTOR = r"^(auto|all|node-[1-9])$"
# A fixed prefix (the window counters) plus a safe glob: no ranges, no escapes.
COUNTER_PATTERN = r"^rl:w:[A-Za-z0-9_*?-]{1,64}$"
MAX_REPAIR_KEYS = 1000

Node = Annotated[str, msgspec.Meta(pattern=NODE_SELECTOR)]


class NodeParams(msgspec.Struct, forbid_unknown_fields=True):
    node: Node = "auto"


class RepairCountersParams(msgspec.Struct, forbid_unknown_fields=True):
    pattern: Annotated[str, msgspec.Meta(pattern=COUNTER_PATTERN)] = "rl:w:*"
    max_keys: Annotated[int, msgspec.Meta(ge=1, le=MAX_REPAIR_KEYS)] = 100
    # False: only give keys without a TTL one (the window); True: also delete the keys
    # without a TTL or above their client's limit.
    reset: bool = False


class SetLimitParams(msgspec.Struct, forbid_unknown_fields=True):
    client: Annotated[str, msgspec.Meta(pattern=CLIENT_NAME)]
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)]


ACTIONS: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        ActionSpec(
            "restart_node",
            "Restart limiter nodes (`auto`: those not answering /health; `all`; or "
            "`node-<i>`). The node re-reads its config file.",
            NodeParams, risk="medium", idempotent=False, timeout_s=15.0, disruptive=True,
        ),
        ActionSpec(
            "reconnect_node",
            "Point nodes at the current Redis primary, with the shared store, and reload "
            "them (`auto`: those whose Redis link failed or that count locally).",
            NodeParams, risk="low", idempotent=True, timeout_s=10.0,
        ),
        ActionSpec(
            "failover_redis",
            "Promote the replica (REPLICAOF NO ONE), demote the old primary if it answers, "
            "and repoint every node at the new primary.",
            NoParams, risk="medium", idempotent=False, timeout_s=15.0,
        ),
        ActionSpec(
            "repair_counters",
            f"Scan at most `max_keys` (<= {MAX_REPAIR_KEYS}) window counters matching "
            "`pattern` (rl:w:<glob>): set missing TTLs; with `reset`, delete the keys "
            "without TTL or above their limit.",
            RepairCountersParams, risk="low", idempotent=True, timeout_s=10.0,
        ),
        ActionSpec(
            "rollback_build",
            "Deploy the last good build on nodes (`auto`: those running another build).",
            NodeParams, risk="low", idempotent=True, timeout_s=10.0,
        ),
        ActionSpec(
            "set_limit",
            f"Set a client's limit per window (1..{MAX_LIMIT}).",
            SetLimitParams, risk="medium", idempotent=True, timeout_s=5.0,
        ),
    )
}
