"""The etcd cluster subject's pure parts: catalog, runbooks, action parameters, observer maths."""

from __future__ import annotations

from typing import Any

import pytest

import subjects
from actors.diagnoser.runbook import vet_actions
from actors.runtime.config import VerifierConfig
from actors.verifier.actor import check_deadline_s
from subjects.base import ActionError
from subjects.kvcluster.chaos import FAULTS as HOOKS
from subjects.kvcluster.definition import DEFINITION, layout_for
from subjects.kvcluster.faults import FAULTS
from subjects.kvcluster.observer import (
    KvClusterObserver,
    MemberView,
    cluster_metrics,
    leader_of,
)
from subjects.rules import check_rules


def test_the_fault_catalog_names_exactly_the_chaos_hooks() -> None:
    assert {f.name for f in FAULTS} == set(HOOKS)
    assert [f.name for f in FAULTS if not f.fixable] == ["quorum_lost"]


def test_the_kind_loads_and_its_options_are_validated_by_the_kind() -> None:
    assert subjects.load("kvcluster") is DEFINITION
    subjects.validate_options("kvcluster", {"cluster_dir": "/tmp/x", "load_rps": 10})
    with pytest.raises(ValueError, match="load_rps"):
        subjects.validate_options("kvcluster", {"load_rps": -1})
    with pytest.raises(ValueError, match="nodes"):
        subjects.validate_options("kvcluster", {"nodes": 5})


def test_runbooks_name_known_invariants_valid_actions_and_parseable_conditions() -> None:
    assert check_rules(DEFINITION.runbooks) == []
    names = {inv.name for inv in DEFINITION.invariants}
    assert {"member_down", "no_leader", "high_latency", "low_disk_space", "raft_lag"} <= names
    for rule in DEFINITION.runbooks:
        assert rule.invariant is None or rule.invariant in names, rule.name
        assert rule.escalate == (not rule.actions), rule.name
        # Every remedy is usable whole, as the diagnoser vets it (a multi-step one: every
        # step registered with valid params, dependencies on its own steps).
        kept, notes = vet_actions(rule.actions, DEFINITION.actions)
        assert notes == [] and len(kept) == len(rule.actions), rule.name


def test_only_the_actions_that_take_a_member_out_are_disruptive() -> None:
    disruptive = {n for n, spec in DEFINITION.actions.items() if spec.disruptive}
    assert disruptive == {"restart_member", "defragment", "replace_member"}


@pytest.mark.parametrize(("action", "params", "needle"), [
    ("defragment", {"member": "../../etc"}, "member"),
    ("restart_member", {"member": "m1", "force": True}, "force"),
    ("disarm_alarm", {"alarm": "CORRUPT"}, "alarm"),
    ("move_leader", {"target": 3}, "target"),
])
def test_bad_action_parameters_are_refused_naming_the_field(action: str, params: dict[str, Any],
                                                            needle: str) -> None:
    with pytest.raises(ActionError, match=rf"{action}: bad parameters: .*{needle}"):
        DEFINITION.actions[action].validate(params)


def _view(name: str, up: bool = True, leader: str = "1", applied: int = 100,
          db: float = 1e6, alarms: tuple[str, ...] = ()) -> MemberView:
    return MemberView(name, up=up, healthy=up, member_id=name[-1] if up else "",
                      leader=leader, applied=applied, db_size=db, quota=8e6, alarms=alarms)


def test_a_leader_needs_a_majority_and_to_answer_itself() -> None:
    assert leader_of([_view("m1"), _view("m2"), _view("m3")]) == "1"
    assert leader_of([_view("m1", up=False), _view("m2"), _view("m3")]) == "0"  # 1 is gone
    assert leader_of([_view("m1"), _view("m2", up=False), _view("m3", up=False)]) == "0"


def test_cluster_metrics_from_member_views() -> None:
    m = cluster_metrics([_view("m1", applied=900), _view("m2", applied=100, db=4e6),
                         _view("m3", up=False)])
    assert m["members_down"] == 1 and m["quorum_members"] == 1
    assert m["raft_lag_entries"] == 800 and m["db_size_ratio"] == 0.5
    assert m["disk_pressure"] == 0.5 and m["nospace_alarm"] == 0
    full = cluster_metrics([_view("m1", alarms=("memberID:1 alarm:NOSPACE ",)), _view("m2")])
    assert full["disk_pressure"] == 1.0 and full["nospace_alarm"] == 1.0


def test_the_layout_comes_from_the_url_base_port_without_a_cluster_dir() -> None:
    class Cfg:
        url = "http://127.0.0.1:2379"
        options: dict[str, Any] = {}

    layout = layout_for(Cfg())
    assert layout.endpoints == {"m1": "http://127.0.0.1:2379", "m2": "http://127.0.0.1:2381",
                                "m3": "http://127.0.0.1:2383"}


async def test_a_silent_cluster_is_down_and_without_quorum() -> None:
    observer = KvClusterObserver({"m1": "http://127.0.0.1:9", "m2": "http://127.0.0.1:9"},
                                 "http://127.0.0.1:9", timeout_s=0.3)
    try:
        obs = await observer.scrape()
    finally:
        await observer.close()
    assert obs["up"] is False and "no member answered" in obs["error"]
    assert obs["metrics"]["quorum_members"] <= 0 and obs["metrics"]["has_leader"] == 0.0


def test_leader_changes_are_counted_within_one_cluster_history() -> None:
    observer = KvClusterObserver({}, "http://127.0.0.1:9")
    assert observer._churn("1", 2, now=0.0) == 0  # the first leader is a beginning
    assert observer._churn("0", 3, now=1.0) == 0  # an election under way: no leader yet
    assert observer._churn("2", 3, now=2.0) == 1
    assert observer._churn("1", 4, now=3.0) == 2
    assert observer._churn("1", 4, now=4.0) == 2  # the same leader is no change
    # The term went down: the cluster was rebuilt from empty data dirs, a new history
    # whose first leader is no change (counting it kept a stale churn incident open).
    assert observer._churn("3", 2, now=5.0) == 0
    assert observer._churn("1", 3, now=6.0) == 1
    assert observer._churn("1", 3, now=67.0) == 0  # out of the minute's window


def test_a_churn_cure_is_judged_only_once_the_churn_has_left_the_window() -> None:
    """move_leader adds a change of its own: the count holds within `clear` again only
    once the changes before it left the minute's window. A verifier that called the fix
    failed sooner would fail every churn cure, and retry it (more churn)."""
    spec = next(s for s in DEFINITION.invariants if s.name == "leader_churn")
    assert spec.clear is not None
    vc = VerifierConfig()
    observer = KvClusterObserver({}, "http://127.0.0.1:9")
    for i, leader in enumerate("12121"):  # four changes in the second before the cure
        observer._churn(leader, 2 + i, now=-1.0 + i * 0.2)
    assert observer._churn("2", 7, now=0.0) > spec.threshold  # the cure's own change
    healthy_at = next(t / 2 for t in range(0, 400)
                      if observer._churn("2", 7, now=t / 2) <= spec.clear)
    deadline = check_deadline_s(vc, DEFINITION, ["leader_churn"])
    assert healthy_at + vc.stable_window_s + 2 * 1.0 <= deadline  # two 1 s scrapes late
    assert check_deadline_s(vc, DEFINITION, ["member_down"]) == vc.deadline_s
    assert check_deadline_s(vc, DEFINITION, ["alert:EtcdDown"]) == vc.alert_deadline_s
