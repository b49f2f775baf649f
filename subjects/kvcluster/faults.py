"""The cluster's fault catalog: what its chaos hooks can break, and whether the crew can cure it.

Beside the chaos hooks (chaos.py) and, like them, never given to an actor.
"""

from __future__ import annotations

from subjects.webshop.faults import FaultSpec

FAULTS: tuple[FaultSpec, ...] = (
    FaultSpec("member_killed", True, "a member SIGKILLed: restart it"),
    FaultSpec("member_hung", True, "a member SIGSTOPped (hung, timed out of the cluster): "
              "restart it"),
    FaultSpec("nospace", True, "history written past the backend quota (NOSPACE, writes "
              "fail): compact, defragment each member one at a time, disarm"),
    FaultSpec("data_dir_removed", True, "a member's data dir deleted while it runs: remove "
              "it and add it back as a new member (high risk: the on-call approves)",
              human_approves=("replace_member",)),
    FaultSpec("quorum_lost", False, "two of three members lost with their data: escalate, "
              "never force a new cluster"),
)
