"""The cluster's registered remediation actions and their typed parameters.

`member` names a member (m1, m2, m3); empty means the one the action is for,
chosen from live state when it runs: the one member that does not answer
(restart, replace), the fullest (defragment), the most caught-up follower
(move_leader). An ambiguous choice is refused, never guessed.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from subjects.base import ActionSpec, NoParams, RetryPolicy

# A member name as the layout spells them; validated again against the live cluster.
MemberName = Annotated[str, msgspec.Meta(pattern=r"^(m[1-9])?$", max_length=8)]


class MemberParams(msgspec.Struct, forbid_unknown_fields=True):
    member: MemberName = ""


class MoveLeaderParams(msgspec.Struct, forbid_unknown_fields=True):
    target: MemberName = ""


class DisarmParams(msgspec.Struct, forbid_unknown_fields=True):
    alarm: Literal["NOSPACE"] = "NOSPACE"  # CORRUPT is for a human, never disarmed here


# A cluster-wide call fails while the members elect a leader (a second or two): retried.
# Disruptive steps are not: their precondition was checked for the first try only.
ELECTION_RETRY = RetryPolicy(attempts=3, backoff_s=0.5, backoff_max_s=2.0)

ACTIONS: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        ActionSpec(
            "restart_member",
            "Restart one member's etcd process (SIGTERM, SIGKILL after 5 s), rejoining with "
            "its own data; waits until it answers healthy. `member` empty: the one member "
            "that does not answer.",
            MemberParams, risk="medium", idempotent=False, timeout_s=20.0, disruptive=True,
        ),
        ActionSpec(
            "compact",
            "Compact the keyspace history up to the current revision (frees pages inside "
            "the backend; the file shrinks only on defragment).",
            NoParams, risk="low", idempotent=True, timeout_s=15.0, retry=ELECTION_RETRY,
        ),
        ActionSpec(
            "defragment",
            "Defragment one member's backend, returning freed space to the disk; the member "
            "blocks while it runs, so every other member must be up. `member` empty: the "
            "member with the largest backend.",
            MemberParams, risk="medium", idempotent=True, timeout_s=30.0, disruptive=True,
        ),
        ActionSpec(
            "disarm_alarm",
            "Deactivate the NOSPACE alarm on every member that raised it, so writes are "
            "accepted again (it is raised again at once if the backend is still over quota).",
            DisarmParams, risk="low", idempotent=True, timeout_s=10.0, retry=ELECTION_RETRY,
        ),
        ActionSpec(
            "move_leader",
            "Transfer raft leadership to `target` (empty: the most caught-up healthy follower).",
            MoveLeaderParams, risk="low", idempotent=True, timeout_s=10.0,
            retry=ELECTION_RETRY,
        ),
        ActionSpec(
            "replace_member",
            "Replace a member that lost its data: stop it, remove it from the cluster, add a "
            "fresh member with the same name and peer URL, start it on an empty data dir "
            "with --initial-cluster-state existing and wait until it is healthy. Refused "
            "for a member that answers, or without a healthy majority.",
            MemberParams, risk="high", idempotent=True, timeout_s=45.0, disruptive=True,
        ),
    )
}
