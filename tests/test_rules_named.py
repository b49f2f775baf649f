"""Every governor refusal names its rule, and the planner acts on the rule, not the words."""

from __future__ import annotations

import pytest

from actors.governor import policy
from actors.planner.attempts import RULE_ENDINGS, ending_of
from actors.runtime.config import GovernorConfig
from bus_schemas.messages import Decision, ExecutionResult, PlanStep
from subjects import load

SHOP = load("webshop").actions
NOW = 1000.0


def judge(step: PlanStep, **kw: object) -> policy.Judgement:
    args: dict[str, object] = dict(subject="shop", kind="webshop", actions=SHOP,
                                   cfg=GovernorConfig(mode="execute", allow={"shop": ["*"]},
                                                      approval_above="high"),
                                   mode="execute", kill_engaged=False, usage=policy.Usage(),
                                   now=NOW, execution_id="e1")
    args.update(kw)
    return policy.judge(step, **args)  # type: ignore[arg-type]


STEP = PlanStep(step_id="s1", action="recycle_pool")


def busy(n: int) -> policy.Usage:
    slots = {f"x{i}": policy.Slot(subject="shop", action="recycle_pool", until=NOW + 60)
             for i in range(n)}
    return policy.Usage(in_flight=slots)


@pytest.mark.parametrize(("step", "kw", "rule"), [
    (STEP, {"kill_engaged": True}, "kill"),
    (STEP, {"mode": "observe"}, "mode"),
    (PlanStep(step_id="s1", action="format_disk"), {}, "registry"),
    (PlanStep(step_id="s1", action="scale_pool", params={"size": "huge"}), {}, "params"),
    (STEP, {"cfg": GovernorConfig(mode="execute", allow={"shop": ["rotate_logs"]})},
     "allow_list"),
    (STEP, {"usage": busy(5)}, "concurrency"),
    (STEP, {"usage": policy.Usage(last_run={"shop/recycle_pool": NOW - 1})}, "cooldown"),
    (STEP, {"usage": policy.Usage(grants=[
        policy.Grant(execution_id=f"g{i}", subject="shop", action="rotate_logs", at=NOW - 1)
        for i in range(6)])}, "rate"),
])
def test_each_veto_names_its_rule(step: PlanStep, kw: dict[str, object], rule: str) -> None:
    j = judge(step, **kw)
    assert j.outcome == "veto" and j.rule == rule, j


def test_waiting_for_a_human_names_why() -> None:
    assert judge(STEP, mode="approve").rule == "mode"
    assert judge(STEP, cfg=GovernorConfig(mode="execute")).rule == "allow_list"


def decision(outcome: str, rule: str) -> Decision:
    return Decision(id="d", outcome=outcome, reason="", rule=rule, plan_id="p",  # type: ignore[arg-type]
                    ends_step=True)


@pytest.mark.parametrize(("rule", "ending"), [
    ("kill", ("park", "kill")), ("mode", ("park", "mode")), ("rate", ("park", "limit")),
    ("cooldown", ("park", "limit")), ("approval_timeout", ("park", "approval")),
    ("allow_list", ("refused", "other")), ("registry", ("refused", "other")),
    ("denied", ("refused", "other")),
])
def test_the_planner_reads_the_rule_not_the_words(rule: str, ending: tuple[str, str]) -> None:
    # No reason text at all: only the rule can say what happened.
    assert ending_of(decision("vetoed", rule)) == ending


def test_a_skipped_result_is_read_by_its_rule() -> None:
    res = ExecutionResult(id="r", execution_id="e", plan_id="p", action="a",
                          status="skipped", detail="", rule="kill")
    assert ending_of(res) == ("park", "kill")
    assert ending_of(ExecutionResult(id="r", execution_id="e", plan_id="p", action="a",
                                     status="failed", rule="kill"))[0] == "failed"


# The executor names these where it decides them (tests/test_executor_admission.py).
@pytest.mark.parametrize(("rule", "ending"), [
    ("kill", ("park", "kill")), ("revoked", ("refused", "other")),
    ("approval_expired", ("park", "expired")), ("mode", ("park", "mode")),
    ("resolved", ("park", "other")), ("lost_lease", ("park", "other")),
    ("not_configured", ("park", "other")), ("registry", ("refused", "other")),
    ("params", ("refused", "other")), ("precondition", ("park", "other")),
])
def test_the_planner_takes_every_executor_refusal_by_its_rule(
        rule: str, ending: tuple[str, str]) -> None:
    assert rule in RULE_ENDINGS
    for status in ("skipped", "cancelled"):
        result = ExecutionResult(execution_id="x", plan_id="p", action="a", status=status,
                                 detail="(words the planner must not need)", rule=rule)
        assert ending_of(result) == ending, (rule, status)
