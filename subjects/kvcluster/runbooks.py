"""Runbook rules for the etcd cluster (the condition syntax is subjects.rules').

Ranked actions are alternatives, best first. Where the repair is several steps
(NOSPACE: compact, defragment each member one at a time, disarm), the actions
are listed in the order a plan runs them, each one safe on its own; a planner
that builds multi-step plans turns them into a chain of `depends_on`.
"""

from __future__ import annotations

from bus_schemas.messages import RecommendedAction as Do
from subjects.base import RunbookRule

NOSPACE_REPAIR = [
    Do(action="compact", rationale="step 1: drop the history up to the current revision"),
    Do(action="defragment", params={"member": "m1"}, rationale="step 2: return m1's freed "
       "pages to the disk (one member at a time: the others keep quorum)"),
    Do(action="defragment", params={"member": "m2"}, rationale="step 3: the same for m2"),
    Do(action="defragment", params={"member": "m3"}, rationale="step 4: the same for m3"),
    Do(action="disarm_alarm", params={"alarm": "NOSPACE"}, rationale="step 5: accept "
       "writes again, now that every backend is under quota"),
]

RUNBOOKS: tuple[RunbookRule, ...] = (
    RunbookRule(
        name="quorum_lost", invariant=None, when={"quorum_members": "<=0"},
        hypothesis="A majority of members is gone: no leader can be elected and no "
                   "membership change is possible. Recovery means restoring from a "
                   "snapshot or deliberately forcing a new cluster from a survivor "
                   "(losing what it did not have): a human's decision.",
        confidence=0.95, escalate=True,
    ),
    RunbookRule(
        name="member_lost_its_data", invariant="member_down",
        when={"members_down": "==1", "quorum_members": ">0"},
        log_contains=["no such file or directory"],
        hypothesis="A member lost its data dir (its last words: a file under its data dir "
                   "no longer exists); restarting it cannot bring it back, it must be "
                   "removed and added again as a new member.",
        confidence=0.9,
        actions=[
            Do(action="replace_member", rationale="remove -> add -> start on an empty data "
               "dir with --initial-cluster-state existing -> wait healthy"),
        ],
    ),
    RunbookRule(
        name="member_not_answering", invariant="member_down",
        when={"members_down": "==1", "quorum_members": ">0"},
        hypothesis="One member does not answer (crashed, killed or hung); the other two "
                   "keep quorum.",
        confidence=0.7,
        actions=[
            Do(action="restart_member", rationale="a fresh process rejoins with its data"),
            Do(action="replace_member", rationale="if it cannot rejoin, its data is gone: "
               "replace it"),
        ],
    ),
    RunbookRule(
        name="nospace_alarm", invariant="low_disk_space", when={"nospace_alarm": ">0.5"},
        hypothesis="The backend passed its quota and the NOSPACE alarm stands: the cluster "
                   "takes no writes. Its history (old revisions) fills it.",
        confidence=0.9, actions=NOSPACE_REPAIR,
    ),
    RunbookRule(
        name="backend_near_quota", invariant="low_disk_space", when={"nospace_alarm": "<0.5"},
        hypothesis="The backend is close to its quota; compaction and defragmentation "
                   "reclaim the history before NOSPACE stops writes.",
        confidence=0.7, actions=NOSPACE_REPAIR[:4],
    ),
    RunbookRule(
        name="no_leader_with_quorum", invariant="no_leader", when={"quorum_members": ">0"},
        hypothesis="A majority answers but agrees on no leader (an election under way or "
                   "a hung leader).",
        confidence=0.6,
        actions=[Do(action="restart_member", rationale="the one member not answering "
                    "may be a hung leader")],
    ),
    RunbookRule(
        name="leader_churn", invariant="leader_churn",
        hypothesis="Leadership keeps changing: a slow or overloaded leader misses heartbeats.",
        confidence=0.5,
        actions=[Do(action="move_leader", rationale="hand leadership to the most "
                    "caught-up follower")],
    ),
    RunbookRule(
        name="slow_puts", invariant="high_latency",
        hypothesis="Puts are slow: a leader election, a hung member or a slow disk.",
        confidence=0.4,
        actions=[Do(action="move_leader", rationale="rule out a slow leader")],
    ),
    RunbookRule(
        name="member_lagging", invariant="raft_lag",
        hypothesis="A member applies far behind the others (a slow disk or a long pause).",
        confidence=0.5,
        actions=[Do(action="restart_member", rationale="a restart catches it up from the "
                    "leader's snapshot")],
    ),
)
