"""What a healthy cluster keeps. Healthy values under the built-in load: every member
answers, one leader, no leader change, put p99 ~5-60 ms, backend ~0.1-0.3 of the
8 MiB quota, applied indexes within a few entries of each other."""

from __future__ import annotations

from subjects.base import InvariantSpec

INVARIANTS: tuple[InvariantSpec, ...] = (
    InvariantSpec(
        name="member_down", metric="members_down", threshold=0.5, for_s=2.0, down_breaks=True,
        description="every member answers its status within 1.5 s",
    ),
    InvariantSpec(
        name="no_leader", metric="has_leader", op=">", threshold=0.5, for_s=3.0,
        down_breaks=True,
        description="a majority of members agree on a leader that answers",
    ),
    InvariantSpec(
        name="leader_churn", metric="leader_changes_1m", threshold=3.5, clear=1.5, for_s=1.0,
        # The count covers the last minute (observer.CHURN_WINDOW_S): a cure shows once
        # the changes before it have left the window, a few scrapes after a minute.
        settle_s=70.0,
        description="fewer than 4 leader changes a minute",
    ),
    InvariantSpec(
        name="high_latency", metric="put_p99_ms", threshold=500.0, clear=250.0, for_s=3.0,
        description="the load generator's put p99 stays below 500 ms",
    ),
    InvariantSpec(
        name="low_disk_space", metric="disk_pressure", threshold=0.8, clear=0.6, for_s=1.0,
        description="the fullest member's backend stays below 80% of its quota and no "
                    "NOSPACE alarm stands",
    ),
    InvariantSpec(
        name="raft_lag", metric="raft_lag_entries", threshold=1000.0, clear=200.0, for_s=5.0,
        description="every answering member's applied index within 1000 entries of the "
                    "most advanced one",
    ),
)
