"""The diagnoser actor: a real process turning opened incidents into diagnoses."""

from __future__ import annotations

import msgspec
import pytest

from actors.diagnoser import runbook
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from subjects import rules
from subjects.base import RunbookRule, SubjectDefinition
from tests.harness import Bus

pytestmark = pytest.mark.e2e


def webshop() -> SubjectDefinition:
    from subjects import load

    return load("webshop")


def satisfying(cond: str) -> float:
    """A value that meets a runbook condition."""
    c = rules.parse_condition(cond)
    t = c.threshold
    if c.op == ">":
        return t + max(1.0, abs(t))
    if c.op == "<":
        return t / 2 if t > 0 else t - 1.0
    return t + 1.0 if c.op == "!=" else t


def incident_for(rule: RunbookRule, invariant: str) -> m.IncidentOpened:
    """A synthetic incident with exactly the symptoms and logs the rule looks for."""
    return m.IncidentOpened(
        incident_id=m.new_id(), subject="webshop", invariant=invariant,
        summary=f"{invariant} broken", value=2.0, threshold=1.0,
        symptoms={metric: satisfying(cond) for metric, cond in rule.when.items()},
        recent_logs=["GET /cart 200 12ms", *(f"ERROR ... {n} ..." for n in rule.log_contains)])


def winning_rule(definition: SubjectDefinition, escalate: bool) -> tuple[RunbookRule, str]:
    """A rule that is the best match for its own synthetic incident."""
    invariants = [i.name for i in definition.invariants] or ["latency_p99"]
    for rule in definition.runbooks:
        if rule.escalate != escalate or not (rule.when or rule.log_contains):
            continue
        invariant = rule.invariant or invariants[0]
        inc = incident_for(rule, invariant)
        ranked = runbook.rank(definition.runbooks, invariant, inc.symptoms, inc.recent_logs)
        if ranked and ranked[0].rule is rule:
            return rule, invariant
    raise AssertionError(f"no self-winning rule with escalate={escalate} in the webshop runbooks")


async def diagnosis_of(bus: Bus, incident: m.IncidentOpened) -> m.Diagnosis:
    async with bus.collect() as col:
        await bus.publish("detector", incident)
        [d] = await col.wait_for(lambda e: isinstance(e, m.Diagnosis)
                                 and e.causation_id == incident.id)
    assert isinstance(d, m.Diagnosis)
    return d


def rule_named(definition: SubjectDefinition, name: str) -> RunbookRule:
    return next(r for r in definition.runbooks if r.name == name)


def webshop_incident(invariant: str, symptoms: dict[str, float],
                     logs: list[str] | None = None) -> m.IncidentOpened:
    return m.IncidentOpened(incident_id=m.new_id(), subject="webshop", invariant=invariant,
                            summary=f"{invariant} broken", value=900.0, threshold=250.0,
                            symptoms=symptoms, recent_logs=logs or [])


async def test_pool_exhaustion_incident_becomes_the_pool_leak_diagnosis(bus: Bus) -> None:
    definition = webshop()
    leak = rule_named(definition, "pool_leak")
    bus.spawn("diagnoser")
    await bus.wait_heartbeat("diagnoser")
    inc = webshop_incident("latency_p99", {"p99_ms": 900.0, "pool_utilization": 1.0,
                                           "cache_hit_ratio": 0.9, "db_p99_ms": 4.0},
                           ["WARN pool: timed out waiting for a connection"])
    d = await diagnosis_of(bus, inc)
    assert d.producer == "diagnoser" and d.source == "runbook"
    assert d.incident_id == inc.incident_id and d.subject == "webshop"
    assert d.invariant == "latency_p99" and d.causation_id == inc.id
    assert d.hypothesis == leak.hypothesis and d.confidence == leak.confidence
    assert not d.escalate
    assert "pool_utilization=1 (rule: >=0.9)" in d.evidence
    assert any("rule pool_leak matched" in e for e in d.evidence)
    # The leak rule's actions first (params validated, normalised), then the
    # latency fallback's as further alternatives.
    assert [(a.action, a.params) for a in d.actions][:2] == [
        ("recycle_pool", {}), ("scale_pool", {"size": 32})]
    assert all(a.action in definition.actions for a in d.actions)


async def test_self_matching_rule_diagnosis_equals_the_pure_runbook_logic(bus: Bus) -> None:
    definition = webshop()
    rule, invariant = winning_rule(definition, escalate=False)
    bus.spawn("diagnoser")
    await bus.wait_heartbeat("diagnoser")
    inc = incident_for(rule, invariant)
    d = await diagnosis_of(bus, inc)
    assert d.hypothesis == rule.hypothesis and d.actions[0].action == rule.actions[0].action
    # The actor adds what the diagnosis was made on (the planner's record of it).
    assert d == msgspec.structs.replace(runbook.diagnose(inc, definition),
                                        producer="diagnoser", ts=d.ts,
                                        symptoms=dict(inc.symptoms))


async def test_upstream_down_gives_an_escalating_diagnosis(bus: Bus) -> None:
    upstream = rule_named(webshop(), "upstream_down")
    bus.spawn("diagnoser")
    await bus.wait_heartbeat("diagnoser")
    d = await diagnosis_of(bus, webshop_incident(
        "error_rate", {"error_rate": 0.4, "upstream_error_rate": 1.0, "pool_utilization": 0.1},
        ["ERROR payments: 502 Bad Gateway"]))
    assert d.escalate and d.actions == [] and d.hypothesis == upstream.hypothesis
    assert "upstream_error_rate=1 (rule: >0.5)" in d.evidence


async def test_no_matching_rule_escalates_with_zero_confidence(bus: Bus) -> None:
    bus.spawn("diagnoser")
    await bus.wait_heartbeat("diagnoser")
    inc = m.IncidentOpened(incident_id=m.new_id(), subject="webshop",
                           invariant="an_invariant_no_rule_knows", summary="?",
                           value=1.0, threshold=0.0)
    d = await diagnosis_of(bus, inc)
    assert d.confidence == 0 and d.actions == [] and d.escalate
    assert "no runbook rule" in d.hypothesis


async def test_redelivered_incident_gives_one_stored_diagnosis(bus: Bus) -> None:
    rule, invariant = winning_rule(webshop(), escalate=False)
    bus.spawn("diagnoser")
    await bus.wait_heartbeat("diagnoser")
    inc = msgspec.structs.replace(incident_for(rule, invariant), producer="detector")
    async with bus.collect() as col:
        # Twice without Nats-Msg-Id: the stream keeps both, the diagnoser sees both.
        for _ in range(2):
            await bus.publish_raw(catalog.bus_subject_of(inc), codec.encode(inc))
        found = await col.wait_for(lambda e: isinstance(e, m.Diagnosis)
                                   and e.causation_id == inc.id, count=2)
    assert found[0].id == found[1].id
    nc = await bus.connect(catalog.ADMIN)
    subject = catalog.bus_subject_of(found[0])
    info = await nc.jetstream().stream_info(catalog.EVENTS_STREAM, subjects_filter=subject)
    assert info.state.subjects == {subject: 1}

