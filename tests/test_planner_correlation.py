"""One cause, one fix: the planner's leader/follower correlation, on a real bus.

A real nats-server and the real planner process; the diagnoses, decisions,
verdicts and resolutions it reacts to are published with the credentials of
the actors that own them. Absence is proven with a barrier (a later input's
output), or by a positive control that the same timer produced, never by a sleep.
"""

from __future__ import annotations

import msgspec
import pytest

from bus_schemas import messages as m
from tests.harness import Bus, Collector, governed

SUBJECT = "webshop"
FIX = m.RecommendedAction(action="recycle_pool", rationale="the shared cause's fix")
OTHER = m.RecommendedAction(action="scale_pool", params={"size": 32}, rationale="headroom")


def diagnosis(invariant: str, *actions: m.RecommendedAction) -> m.Diagnosis:
    return m.Diagnosis(incident_id=m.new_id(), subject=SUBJECT, invariant=invariant,
                       hypothesis="connections leak from the pool", confidence=0.85,
                       actions=list(actions))


async def fresh_look(bus: Bus, col: Collector, incident: str,
                     *actions: m.RecommendedAction) -> m.DiagnosisRequested:
    """Wait for the planner's request for a fresh diagnosis of `incident`; answer it as the
    diagnoser would (the planner plans from fresh evidence, issue 9)."""
    [req] = await col.wait_for(lambda e: isinstance(e, m.DiagnosisRequested)
                               and e.incident_id == incident)
    assert isinstance(req, m.DiagnosisRequested)
    await bus.publish("diagnoser", m.Diagnosis(
        incident_id=incident, subject=SUBJECT, invariant=req.invariant,
        hypothesis="fresh look", confidence=0.8, request_id=req.id, actions=list(actions)))
    return req


def plans(col: Collector, incident: str) -> list[m.Plan]:
    return [p for p in col.events(m.Plan) if p.incident_id == incident]


async def plan_of(col: Collector, incident: str, **match: object) -> m.Plan:
    def ok(e: m.Event) -> bool:
        return isinstance(e, m.Plan) and e.incident_id == incident and all(
            getattr(e, k) == v for k, v in match.items())

    found = await col.wait_for(ok, timeout=30)
    plan: m.Plan = found[0]
    return plan


async def barrier(bus: Bus, col: Collector) -> None:
    """Every input published so far has been handled (the planner keeps stream order)."""
    sentinel = diagnosis("memory", m.RecommendedAction(action="enable_cache"))
    await bus.publish("diagnoser", sentinel)
    # Its own plan, or one that lets a remediation under way settle first.
    await plan_of(col, sentinel.incident_id)


async def three_incidents(bus: Bus, col: Collector, leader_actions: tuple[m.RecommendedAction,
                          ...] = (FIX, OTHER)) -> tuple[str, str, str]:
    """One cause breaks three invariants: three diagnoses, the same first action."""
    lead = diagnosis("pool_saturation", *leader_actions)
    f1 = diagnosis("latency_p99", FIX, OTHER)
    f2 = diagnosis("error_rate", FIX, OTHER)
    for d in (lead, f1, f2):
        await bus.publish("diagnoser", d)
    await plan_of(col, lead.incident_id, attempt=1)
    for f in (f1, f2):
        await plan_of(col, f.incident_id, follows=lead.incident_id)
    return lead.incident_id, f1.incident_id, f2.incident_id


async def start(bus: Bus) -> None:
    bus.write_config("[planner]\nfollow_grace_s = 2.0\nmax_attempts = 3\n")
    bus.spawn("planner")
    await bus.wait_heartbeat("planner")


@pytest.mark.e2e
async def test_three_incidents_of_one_cause_get_one_real_plan_and_two_followers(bus: Bus) -> None:
    await start(bus)
    async with bus.collect() as col:
        lead, f1, f2 = await three_incidents(bus, col)
        await barrier(bus, col)
    [leader_plan] = plans(col, lead)
    assert leader_plan.attempt == 1 and not leader_plan.follows
    assert [s.action for s in leader_plan.steps] == ["recycle_pool"]
    for f in (f1, f2):
        [p] = plans(col, f)
        assert p.follows == lead and p.steps == [] and p.attempt == 0
        assert "one cause, one fix" in p.rationale
    real = [p for i in (lead, f1, f2) for p in plans(col, i) if p.steps]
    assert len(real) == 1


@pytest.mark.e2e
async def test_followers_escalate_with_their_leader(bus: Bus) -> None:
    await start(bus)
    async with bus.collect() as col:
        lead, f1, f2 = await three_incidents(bus, col, leader_actions=(FIX,))
        [leader_plan] = plans(col, lead)
        # The governor vetoes the leader's only plan: no alternative left, it escalates.
        await bus.publish("governor", governed(m.Decision(
            incident_id=lead, subject=SUBJECT, outcome="vetoed", reason="allow-list",
            plan_id=leader_plan.plan_id, execution_id=m.new_id(), ends_step=True)))
        escalated = await col.wait_for(
            lambda e: isinstance(e, m.IncidentEscalated) and e.incident_id in {lead, f1, f2},
            timeout=30, count=3)
        await barrier(bus, col)
    by_incident = {e.incident_id: e for e in escalated}
    assert set(by_incident) == {lead, f1, f2}
    for f in (f1, f2):
        assert f"escalated with incident {lead}" in by_incident[f].reason
        assert [p.steps for p in plans(col, f)] == [[]]  # only the follows plan, ever
    assert len(col.events(m.IncidentEscalated)) == 3  # one each, no duplicates


@pytest.mark.e2e
async def test_after_the_leader_verifies_a_resolved_follower_rests_and_a_broken_one_is_planned(
        bus: Bus) -> None:
    await start(bus)
    async with bus.collect() as col:
        lead, resolved, broken = await three_incidents(bus, col)
        [leader_plan] = plans(col, lead)
        await bus.publish("verifier", m.Verdict(
            incident_id=lead, subject=SUBJECT, plan_id=leader_plan.plan_id,
            invariant="pool_saturation", passed=True, reason="held for 3 s"))
        # One follower's invariant holds again by itself, within the grace.
        await bus.publish("detector", m.IncidentResolved(
            incident_id=resolved, subject=SUBJECT, invariant="latency_p99",
            reason="p99 back under 200 ms"))
        # The other does not: after follow_grace_s it gets a fresh diagnosis, then its
        # own plan. The same grace-loop pass judged both followers.
        req = await fresh_look(bus, col, broken,
                               m.RecommendedAction(action="scale_pool", params={"size": 32}))
        own = await plan_of(col, broken, attempt=1)
        await barrier(bus, col)
    assert "recycle_pool settled on incident" in req.reason
    assert not own.follows and [s.action for s in own.steps] == ["scale_pool"]
    assert own.steps[0].params == {"size": 32}
    assert [p.steps for p in plans(col, resolved)] == [[]]  # no plan of its own
    assert not col.events(m.IncidentEscalated)
    assert len([p for p in plans(col, lead) if p.steps]) == 1  # the leader ran once


@pytest.mark.e2e
async def test_an_incident_during_a_change_waits_for_it_to_settle(bus: Bus) -> None:
    """A symptom seen while another fix is verified may be its tail: no second change, no page."""
    await start(bus)
    async with bus.collect() as col:
        first = diagnosis("pool_saturation", m.RecommendedAction(action="recycle_pool"))
        lead = first.incident_id
        await bus.publish("diagnoser", first)
        leader_plan = await plan_of(col, lead, attempt=1)
        other = diagnosis("latency_p99", m.RecommendedAction(action="failover_dependency"))
        unsure = msgspec.structs.replace(
            diagnosis("error_rate"), escalate=True, hypothesis="unclear cause")
        await bus.publish("diagnoser", other)
        await bus.publish("diagnoser", unsure)
        waits = await plan_of(col, other.incident_id)
        page = await plan_of(col, unsure.incident_id)
        # The leader's change settles badly: the followers are judged on their own.
        await bus.publish("verifier", m.Verdict(
            incident_id=lead, subject=SUBJECT, plan_id=leader_plan.plan_id,
            invariant="pool_saturation", passed=False, reason="still saturated"))
        # ... and its fresh diagnosis has nothing new: the leader escalates, and only then
        # is its change over (a failed verdict alone starts its next attempt).
        await fresh_look(bus, col, lead)
        await fresh_look(bus, col, other.incident_id,
                         m.RecommendedAction(action="failover_dependency"))
        own = await plan_of(col, other.incident_id, attempt=1)
        esc = await col.wait_for(lambda e: isinstance(e, m.IncidentEscalated)
                                 and e.incident_id == unsure.incident_id)
    assert waits.follows == lead and not waits.steps and "settling" in waits.rationale
    assert page.follows == lead and not page.steps
    assert [s.action for s in own.steps] == ["failover_dependency"]
    assert "asks for a human: unclear cause" in esc[0].reason
