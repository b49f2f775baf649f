"""Runbook rules for the etcd cluster (the condition syntax is subjects.rules').

Ranked actions are alternatives, best first. Where the repair is several steps
(NOSPACE: compact, defragment each member one at a time, disarm), it is one
remedy with `steps`: one plan, run in waves by the governor, verified as a whole.
"""

from __future__ import annotations

from bus_schemas.messages import RecommendedAction as Do
from bus_schemas.messages import RecommendedStep as Step
from subjects.base import RunbookRule


def _reclaim(disarm: bool) -> Do:
    """compact -> defragment m1, m2, m3 (wave 2; each takes its member out while it
    runs, so the blast radius lets one at a time) -> disarm the alarm."""
    defrags = [Step(id=f"defrag_{m}", action="defragment", params={"member": m},
                    depends_on=["compact"]) for m in ("m1", "m2", "m3")]
    disarming = [Step(id="disarm", action="disarm_alarm", params={"alarm": "NOSPACE"},
                      depends_on=[d.id for d in defrags])] if disarm else []
    return Do(action="nospace_repair" if disarm else "reclaim_space",
              rationale="compact the history to the current revision, defragment each "
              "member one at a time (the others keep quorum)" +
              (", then disarm NOSPACE so writes are accepted again" if disarm else ""),
              steps=[Step(id="compact", action="compact"), *defrags, *disarming])


NOSPACE_REPAIR = [_reclaim(disarm=True)]


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
        confidence=0.7, actions=[_reclaim(disarm=False)],
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
