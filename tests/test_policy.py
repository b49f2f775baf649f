"""The governor's policy as pure functions: no bus needed."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from actors.governor import policy
from actors.runtime.config import GovernorConfig
from bus_schemas.messages import Mode, PlanStep
from subjects.base import ActionSpec, NoParams, RetryPolicy


class ScaleParams(msgspec.Struct, forbid_unknown_fields=True):
    size: int


ACTIONS = {
    "recycle_pool": ActionSpec("recycle_pool", "", NoParams, "low", True, 5.0),
    "scale_pool": ActionSpec("scale_pool", "", ScaleParams, "medium", True, 20.0),
    "restart_worker": ActionSpec("restart_worker", "", NoParams, "high", False, 8.0),
    "defragment": ActionSpec("defragment", "", NoParams, "low", True, 5.0, disruptive=True,
                             retry=RetryPolicy(attempts=3, backoff_s=1.0)),
}
NOW = 1_000_000.0


def step(action: str = "recycle_pool", sid: str = "s1", **kw: Any) -> PlanStep:
    return PlanStep(step_id=sid, action=action, **kw)


def gcfg(**kw: Any) -> GovernorConfig:
    """A config that lets these tests reach the rule they are about: every action of
    "shop" allowed, medium risk autonomous (the shipped defaults are stricter)."""
    return GovernorConfig(**{"mode": "execute", "allow": {"shop": ["*"]},
                             "approval_above": "medium", **kw})


def judge(s: PlanStep, *, cfg: GovernorConfig | None = None, mode: Mode = "execute",
          kill: bool = False, usage: policy.Usage | None = None, eid: str = "e1",
          human: bool = False, now: float = NOW, plan: str = "") -> policy.Judgement:
    return policy.judge(s, subject="shop", kind="webshop", actions=ACTIONS,
                        cfg=cfg or gcfg(), mode=mode, kill_engaged=kill,
                        usage=usage or policy.Usage(), now=now, execution_id=eid,
                        human_approved=human, plan_id=plan)


def test_a_registered_low_risk_step_is_approved_with_registry_values() -> None:
    j = judge(step(timeout_s=99.0, idempotent=True))
    assert j.outcome == "approve"
    assert j.step.timeout_s == 5.0 and j.step.risk == "low"


def test_kill_and_observe_veto_before_anything_else() -> None:
    assert judge(step("nope"), kill=True).reason == "kill switch engaged"
    assert judge(step("nope"), mode="observe").reason.startswith("observe mode")


def test_unregistered_action_is_vetoed_naming_the_registry() -> None:
    j = judge(step("drop_database"))
    assert j.outcome == "veto"
    assert "'drop_database' is not registered" in j.reason and "recycle_pool" in j.reason


def test_bad_params_are_vetoed_with_the_validation_message() -> None:
    j = judge(step("scale_pool", params={"size": "huge"}))
    assert j.outcome == "veto" and "scale_pool: bad parameters" in j.reason and "size" in j.reason
    assert judge(step("recycle_pool", params={"extra": 1})).outcome == "veto"
    assert judge(step("scale_pool", params={"size": 4})).outcome == "approve"


def test_an_allow_list_vetoes_other_actions_on_its_subject_only() -> None:
    cfg = gcfg(allow={"shop": ["scale_pool"], "elsewhere": []})
    j = judge(step("recycle_pool"), cfg=cfg)
    assert j.outcome == "veto" and "allow-list" in j.reason
    assert judge(step("scale_pool", params={"size": 2}), cfg=cfg).outcome == "approve"
    # A human approval does not widen an explicit list.
    assert judge(step("recycle_pool"), cfg=cfg, human=True).outcome == "veto"


def test_the_shipped_defaults_are_the_closed_ones() -> None:
    c = GovernorConfig()
    assert c.mode == "approve" and c.allow == {} and c.approval_above == "low"
    assert judge(step("scale_pool", params={"size": 2}),
                 cfg=gcfg(approval_above="low")).outcome == "await_human"


def test_an_empty_allow_list_allows_nothing() -> None:
    cfg = gcfg(allow={"shop": []})
    for s in (step(), step("scale_pool", params={"size": 2})):
        j = judge(s, cfg=cfg)
        assert j.outcome == "veto" and "not in the allow-list of 'shop'" in j.reason
        assert judge(s, cfg=cfg, human=True).outcome == "veto"


def test_star_allows_every_registered_action_and_nothing_unregistered() -> None:
    cfg = gcfg(allow={"shop": ["*"]})
    for name in ACTIONS:
        params = {"size": 2} if name == "scale_pool" else {}
        assert judge(step(name, params=params), cfg=cfg).outcome != "veto", name
    assert judge(step("drop_database"), cfg=cfg).outcome == "veto"


def test_a_subject_without_an_allow_entry_runs_nothing_without_a_human() -> None:
    cfg = gcfg(allow={"elsewhere": ["*"]})
    j = judge(step(), cfg=cfg)  # low risk, execute mode: still a human's call
    assert j.outcome == "await_human"
    assert "no allow-list entry for 'shop'" in j.reason and "[governor.allow]" in j.reason
    assert judge(step(), cfg=cfg, human=True).outcome == "approve"
    assert judge(step("drop_database"), cfg=cfg).outcome == "veto"  # the registry still rules


def test_risk_above_threshold_and_approve_mode_need_a_human() -> None:
    j = judge(step("restart_worker"))
    assert j.outcome == "await_human" and "risk high" in j.reason
    assert not j.step.idempotent  # the registry's word, whatever the plan said
    assert judge(step(), mode="approve").outcome == "await_human"
    assert judge(step(), mode="approve", human=True).outcome == "approve"
    # A plan may raise the risk, never lower it.
    assert judge(step(risk="high")).outcome == "await_human"
    assert judge(step("restart_worker", risk="low")).step.risk == "high"
    # A human approval does not override the kill switch or observe mode.
    assert judge(step(), human=True, kill=True).outcome == "veto"
    assert judge(step(), human=True, mode="observe").outcome == "veto"


def released(usage: policy.Usage, eid: str, action: str = "recycle_pool", subject: str = "shop",
             at: float = NOW, until: float = NOW + 100, plan: str = "",
             disruptive: bool = False) -> policy.Usage:
    s = step(action)
    slot = policy.Slot(subject=subject, action=action, until=until, plan_id=plan,
                       disruptive=disruptive)
    return policy.record_release(usage, eid, s, subject, at, slot)


def test_the_concurrency_limit_vetoes_until_a_slot_is_freed_or_expires() -> None:
    cfg = gcfg(max_concurrent=1, action_cooldown_s=0)
    u = released(policy.Usage(), "a")
    j = judge(step(), cfg=cfg, usage=u, eid="b")
    assert j.outcome == "veto" and j.reason.startswith("concurrency limit")
    assert judge(step(), cfg=cfg, usage=policy.free_slot(u, "a"), eid="b").outcome == "approve"
    # A slot whose holder never reported expires at `until`.
    assert judge(step(), cfg=cfg, usage=u, eid="b", now=NOW + 101).outcome == "approve"


def test_rate_limits_veto_per_subject_and_overall_in_a_sliding_minute() -> None:
    cfg = gcfg(max_per_subject_per_minute=2, max_per_minute=3, max_concurrent=99,
                         action_cooldown_s=0)
    u = released(released(policy.Usage(), "a"), "b")
    j = judge(step(), cfg=cfg, usage=u, eid="c")
    assert j.outcome == "veto" and "on 'shop' in the last minute (max 2)" in j.reason
    u = released(released(policy.Usage(), "a", subject="x"), "b", subject="y")
    u = released(u, "c", subject="z")
    j = judge(step(), cfg=cfg, usage=u, eid="d")
    assert j.outcome == "veto" and "in the last minute (max 3)" in j.reason
    # The window slides.
    assert judge(step(), cfg=cfg, usage=u, eid="d", now=NOW + 61).outcome == "approve"


def test_a_cooldown_vetoes_the_same_action_on_the_subject_until_it_passes() -> None:
    cfg = gcfg(action_cooldown_s=5, max_concurrent=99)
    u = released(policy.Usage(), "a")
    j = judge(step(), cfg=cfg, usage=u, eid="b", now=NOW + 1)
    assert j.outcome == "veto" and j.reason.startswith("cooldown: 'recycle_pool'")
    assert judge(step("scale_pool", params={"size": 1}), cfg=cfg, usage=u, eid="b",
                 now=NOW + 1).outcome == "approve"
    assert judge(step(), cfg=cfg, usage=u, eid="b", now=NOW + 6).outcome == "approve"


def test_a_plans_own_steps_are_not_each_others_cooldown() -> None:
    cfg = gcfg(action_cooldown_s=60, max_concurrent=99)
    u = released(policy.Usage(), "a", plan="p1")
    assert judge(step(), cfg=cfg, usage=u, eid="b", now=NOW + 1, plan="p1").outcome == "approve"
    j = judge(step(), cfg=cfg, usage=u, eid="b", now=NOW + 1, plan="p2")
    assert j.outcome == "veto" and j.rule == "cooldown"


def test_blast_radius_vetoes_a_second_disruptive_step_on_the_subject_only() -> None:
    cfg = gcfg(max_concurrent=99, action_cooldown_s=0)
    u = released(policy.Usage(), "a", action="defragment", plan="p1", disruptive=True)
    j = judge(step("defragment"), cfg=cfg, usage=u, eid="b", plan="p2")
    assert (j.outcome, j.rule) == ("veto", "blast_radius")
    assert "1 disruptive step(s) already in flight on 'shop' (defragment; max 1)" in j.reason
    # Not disruptive, another subject's, freed, or a wider radius: approved.
    assert judge(step(), cfg=cfg, usage=u, eid="b").outcome == "approve"
    other = released(policy.Usage(), "a", subject="x", action="defragment", disruptive=True)
    assert judge(step("defragment"), cfg=cfg, usage=other, eid="b").outcome == "approve"
    assert judge(step("defragment"), cfg=cfg, usage=policy.free_slot(u, "a"),
                 eid="b").outcome == "approve"
    wide = gcfg(max_concurrent=99, action_cooldown_s=0, max_disruptive_per_subject=2)
    assert judge(step("defragment"), cfg=wide, usage=u, eid="b").outcome == "approve"


def test_the_registry_marks_disruptive_and_retries_only_an_idempotent_step() -> None:
    j = judge(step("defragment"))
    assert j.step.disruptive and j.step.attempts == 3
    assert j.step.budget_s == 3 * 5.0 + 1.0 + 2.0  # every try and both pauses
    # A plan that says its step is not idempotent gets no retry.
    j = judge(step("defragment", idempotent=False))
    assert not j.step.idempotent and j.step.attempts == 1 and j.step.budget_s == 5.0
    # A plan may not claim a registered disruptive action is harmless.
    assert judge(step("defragment", disruptive=False)).step.disruptive


def test_judging_the_same_execution_again_does_not_count_itself() -> None:
    cfg = gcfg(max_concurrent=1, max_per_subject_per_minute=1, action_cooldown_s=60)
    u = released(policy.Usage(), "a")
    assert judge(step(), cfg=cfg, usage=u, eid="a", now=NOW + 1).outcome == "approve"


def test_prune_forgets_what_no_longer_matters() -> None:
    u = released(policy.Usage(), "a", until=NOW + 10)
    p = policy.prune(u, NOW + 100, keep_s=5)
    assert p.grants == [] and p.last_run == {}
    # An expired slot is kept for the governor to end its step (an `expired` Decision),
    # but counts against nothing.
    assert list(p.in_flight) == ["a"]
    assert judge(step(), cfg=gcfg(max_concurrent=1, action_cooldown_s=0), usage=p, eid="b",
                 now=NOW + 100).outcome == "approve"


def test_dag_problems_name_unknown_deps_cycles_and_duplicates() -> None:
    steps = [step(sid="a"), step(sid="b", depends_on=["a"]), step(sid="c", depends_on=["zz"]),
             step(sid="d", depends_on=["e"]), step(sid="e", depends_on=["d"]),
             step(sid="f", depends_on=["c"])]
    problems = policy.dag_problems(steps)
    assert problems["c"] == "depends on unknown step(s) zz"
    assert problems["d"] == problems["e"] == "dependency cycle"
    assert "a" not in problems and "b" not in problems
    assert policy.dag_problems([step(sid="x"), step(sid="x")]) == {"x": "duplicate step id 'x'"}


@pytest.mark.parametrize("risk,above,needs", [("medium", "medium", False),
                                              ("high", "medium", True),
                                              ("medium", "low", True), ("low", "low", False)])
def test_approval_threshold_is_strictly_above(risk: str, above: str, needs: bool) -> None:
    cfg = gcfg(approval_above=above)  # type: ignore[arg-type]
    j = judge(step(risk=risk), cfg=cfg)
    assert (j.outcome == "await_human") is needs
