"""Runbook diagnosis, pure: condition matching, rule matching, ranking, action vetting."""

from __future__ import annotations

import math

import msgspec
import pytest

from actors.diagnoser.runbook import RunbookDiagnoser, diagnose, rank, vet_actions
from bus_schemas.messages import IncidentOpened, RecommendedAction
from bus_schemas.messages import RecommendedStep as Step
from subjects.base import ActionSpec, NoParams, RunbookRule, SubjectDefinition
from subjects.rules import ConditionError, check_rules, match_condition, parse_condition


class SizeParams(msgspec.Struct, forbid_unknown_fields=True):
    size: int


ACTIONS = {
    "recycle_pool": ActionSpec("recycle_pool", "", NoParams, risk="low", idempotent=True),
    "scale_pool": ActionSpec("scale_pool", "", SizeParams, risk="medium", idempotent=True),
    "restart_worker": ActionSpec("restart_worker", "", NoParams, risk="medium",
                                 idempotent=False),
}


def rule(name: str, **kw: object) -> RunbookRule:
    kw.setdefault("hypothesis", f"{name} hypothesis")
    kw.setdefault("confidence", 0.5)
    return RunbookRule(name=name, **kw)  # type: ignore[arg-type]


def definition(*rules: RunbookRule) -> SubjectDefinition:
    return SubjectDefinition(kind="test", actions=ACTIONS, invariants=(), runbooks=rules,
                             make_observer=lambda _c: None,  # type: ignore[arg-type,return-value]
                             make_action_client=lambda _c: None)  # type: ignore[arg-type,return-value]


def incident(invariant: str = "latency_p99", symptoms: dict[str, float] | None = None,
             logs: list[str] | None = None) -> IncidentOpened:
    return IncidentOpened(id="inc-1", incident_id="inc-1", subject="webshop",
                          invariant=invariant, summary="p99 high", value=900.0,
                          threshold=250.0, symptoms=symptoms or {}, recent_logs=logs or [])


# --- conditions ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "cond", "expected"), [
    (0.95, ">0.9", True), (0.9, ">0.9", False), (0.9, ">=0.9", True),
    (0.5, "<0.9", True), (0.9, "<=0.9", True), (0.91, "<=0.9", False),
    (0.0, "==0", True), (1e-15, "==0", True), (1.0, "==0", False), (2.0, "!=0", True),
    (3.0, " > 2 ", True), (-1.0, "<-0.5", True), (1500.0, ">1e3", True),
])
def test_condition_compares_value_with_threshold(value: float, cond: str,
                                                 expected: bool) -> None:
    assert match_condition(value, cond) is expected


def test_nan_never_satisfies_a_condition() -> None:
    assert not match_condition(math.nan, ">0") and not match_condition(math.nan, "!=0")


@pytest.mark.parametrize("cond", ["", "0.9", "=>0.9", ">", ">abc", "~0.5", ">nan", "> 1 2"])
def test_malformed_condition_is_a_clear_error(cond: str) -> None:
    with pytest.raises(ConditionError, match="bad condition"):
        parse_condition(cond)


def test_check_rules_reports_bad_conditions_and_confidence() -> None:
    problems = check_rules([rule("a", when={"x": "about 3"}), rule("b", confidence=1.5),
                            rule("ok", when={"x": ">1"})])
    assert len(problems) == 2
    assert "rule a: x" in problems[0] and "rule b" in problems[1]


# --- matching and ranking -------------------------------------------------------------


def test_rule_matches_only_its_invariant() -> None:
    rules = [rule("other", invariant="error_rate"), rule("any"), rule("mine",
                                                                      invariant="latency_p99")]
    names = [m.rule.name for m in rank(rules, "latency_p99", {}, [])]
    assert sorted(names) == ["any", "mine"]


def test_every_condition_must_hold_and_missing_metric_does_not_match() -> None:
    r = rule("pool", when={"pool_utilization": ">0.9", "db_latency_ms": "<50"})
    assert rank([r], "latency_p99", {"pool_utilization": 0.97, "db_latency_ms": 10}, [])
    assert not rank([r], "latency_p99", {"pool_utilization": 0.97, "db_latency_ms": 80}, [])
    assert not rank([r], "latency_p99", {"pool_utilization": 0.97}, [])


def test_log_needles_match_case_insensitive_substrings_all_required() -> None:
    r = rule("upstream", log_contains=["connection refused", "catalog-db"])
    logs = ["GET /cart 200", "ERROR Connection REFUSED by catalog-db:5432"]
    match = rank([r], "latency_p99", {}, logs)
    assert match and any("connection refused" in e for e in match[0].evidence)
    assert not rank([r], "latency_p99", {}, ["ERROR connection refused by cache"])


def test_log_lines_are_data_not_patterns() -> None:
    # A regex-looking needle or line is compared literally.
    r = rule("literal", log_contains=[".*"])
    assert not rank([r], "latency_p99", {}, ["anything at all"])
    assert rank([r], "latency_p99", {}, ["path was .* literally"])


def test_only_recent_bounded_logs_are_searched() -> None:
    r = rule("old", log_contains=["ancient"])
    assert not rank([r], "latency_p99", {}, ["ancient"] + ["noise"] * 500)


def test_ranking_prefers_confidence_then_specificity_then_order() -> None:
    rules = [
        rule("broad", confidence=0.6),
        rule("specific", confidence=0.6, when={"pool_utilization": ">0.5"}),
        rule("confident", confidence=0.9),
        rule("later_tie", confidence=0.6, when={"pool_utilization": ">0.1"}),
    ]
    names = [m.rule.name for m in rank(rules, "latency_p99", {"pool_utilization": 0.8}, [])]
    assert names == ["confident", "specific", "later_tie", "broad"]


# --- diagnoses -------------------------------------------------------------------------


def test_best_match_gives_hypothesis_evidence_and_ranked_actions() -> None:
    d = definition(
        rule("pool_exhausted", when={"pool_utilization": ">0.9"}, confidence=0.8,
             hypothesis="connection pool exhausted",
             actions=[RecommendedAction(action="recycle_pool", rationale="free leaks"),
                      RecommendedAction(action="scale_pool", params={"size": 32})]),
        rule("generic_slow", confidence=0.3,
             actions=[RecommendedAction(action="restart_worker"),
                      RecommendedAction(action="recycle_pool")]),
    )
    dg = diagnose(incident(symptoms={"pool_utilization": 0.97}), d)
    assert dg.hypothesis == "connection pool exhausted"
    assert dg.confidence == 0.8 and dg.source == "runbook" and not dg.escalate
    assert any("pool_utilization=0.97" in e and ">0.9" in e for e in dg.evidence)
    assert any("also matched: rule generic_slow" in e for e in dg.evidence)
    # the best rule's actions first, then the other match's, without duplicates
    assert [a.action for a in dg.actions] == ["recycle_pool", "scale_pool", "restart_worker"]
    assert dg.actions[1].params == {"size": 32}
    assert dg.incident_id == "inc-1" and dg.causation_id == "inc-1"


def test_unregistered_and_invalid_actions_are_dropped_and_noted() -> None:
    d = definition(rule("r", actions=[
        RecommendedAction(action="rm_rf", params={}),
        RecommendedAction(action="scale_pool", params={"size": "huge"}),
        RecommendedAction(action="scale_pool", params={"size": 8, "extra": 1}),
        RecommendedAction(action="recycle_pool"),
    ]))
    dg = diagnose(incident(), d)
    assert [a.action for a in dg.actions] == ["recycle_pool"]
    notes = [e for e in dg.evidence if e.startswith("dropped action")]
    assert len(notes) == 3 and "not registered" in notes[0] and "size" in notes[1]


def test_rule_left_without_valid_actions_escalates() -> None:
    d = definition(rule("r", actions=[RecommendedAction(action="nope")]))
    dg = diagnose(incident(), d)
    assert dg.escalate and dg.actions == [] and dg.confidence == 0.5


def test_escalating_rule_gives_no_actions() -> None:
    d = definition(
        rule("upstream_down", confidence=0.9, escalate=True, log_contains=["upstream"],
             hypothesis="an upstream dependency is down"),
        rule("fallback", confidence=0.2, actions=[RecommendedAction(action="restart_worker")]),
    )
    dg = diagnose(incident(logs=["upstream timeout"]), d)
    assert dg.escalate and dg.actions == [] and dg.hypothesis.startswith("an upstream")


def test_no_match_escalates_with_zero_confidence() -> None:
    d = definition(rule("pool", when={"pool_utilization": ">0.9"}))
    dg = diagnose(incident(symptoms={"pool_utilization": 0.2}), d)
    assert dg.confidence == 0 and dg.actions == [] and dg.escalate
    assert "no runbook rule" in dg.hypothesis


async def test_diagnosis_id_is_deterministic_per_incident_event() -> None:
    d = definition(rule("r", actions=[RecommendedAction(action="recycle_pool")]))
    first = await RunbookDiagnoser().diagnose(incident(), d)
    again = await RunbookDiagnoser().diagnose(incident(), d)
    assert first.id == again.id
    other = msgspec.structs.replace(incident(), id="inc-2")
    assert (await RunbookDiagnoser().diagnose(other, d)).id != first.id


# --- a fresh look: what was tried and failed is not repeated unless the evidence changed ---


def test_a_tried_and_failed_action_is_dropped_unless_the_evidence_changed() -> None:
    import subjects
    from actors.diagnoser.runbook import evidence_changed, exclude_tried
    from bus_schemas.messages import AttemptRecord, Diagnosis, RecommendedAction

    shop = subjects.load("webshop")
    before = {"p99_ms": 900.0, "pool_utilization": 0.3, "cache_hit_ratio": 0.05,
              "db_qps": 40.0, "error_rate": 0.0}
    d = Diagnosis(incident_id="i1", subject="webshop", invariant="latency_p99",
                  hypothesis="cache off", actions=[RecommendedAction(action="enable_cache"),
                                                   RecommendedAction(action="restart_worker")])
    tried = [AttemptRecord(attempt=1, action="enable_cache", outcome="verdict_failed",
                           symptoms_before=before)]
    same = exclude_tried(d, tried, [], {**before, "p99_ms": 950.0}, shop)
    assert [a.action for a in same.actions] == ["restart_worker"]
    assert any("not repeating enable_cache" in e for e in same.evidence)
    moved = {**before, "pool_utilization": 1.0}  # another invariant breaks now
    assert evidence_changed(before, moved, shop, 2.0, 0.01)
    again = exclude_tried(d, tried, ["restart_worker"], moved, shop)
    assert [a.action for a in again.actions] == ["enable_cache"]
    assert any("evidence changed" in e for e in again.evidence)
    assert any("refused" in e for e in again.evidence)


def test_a_multi_step_remedy_is_kept_whole_or_dropped_naming_its_bad_step() -> None:
    good = RecommendedAction(action="drain_and_recycle", steps=[
        Step(id="a", action="recycle_pool"), Step(id="b", action="recycle_pool",
                                                 depends_on=["a"], mode="async")])
    kept, notes = vet_actions([good], ACTIONS)
    assert kept == [good] and notes == []
    bad = [
        msgspec.structs.replace(good, steps=[*good.steps, Step(id="c", action="format")]),
        msgspec.structs.replace(good, steps=[Step(id="a", action="recycle_pool",
                                                  depends_on=["zz"])]),
        msgspec.structs.replace(good, steps=[Step(id="a", action="recycle_pool"),
                                             Step(id="a", action="recycle_pool")]),
    ]
    kept, notes = vet_actions(bad, ACTIONS)
    assert kept == []
    assert notes == [
        "dropped remedy 'drain_and_recycle': 'format' is not registered for this subject",
        "dropped remedy 'drain_and_recycle': step 'a' depends on a step the remedy does "
        "not have",
        "dropped remedy 'drain_and_recycle': step id 'a' is empty or repeated"]
