"""Every way a step can end moves its incident on: the next alternative, a park that
tries again, or a human.

The planner and the governor run as real processes on a real nats-server; the
test plays the diagnoser (and the human). Each test ends with the incident's
next Plan, an IncidentParked followed by the retried Plan, or its
IncidentEscalated. A "no" (a veto by the allow-list, a denial, a revocation)
moves to the next alternative; an obstacle (the kill switch, an approval
nobody gave in time, an approval nobody ran) parks and tries the same action
again without using an attempt (issue 9). The executor-side endings (skipped,
unknown, cancelled) are ExecutionResults: see the pure state machine in
tests/test_planner.py.
"""

from __future__ import annotations

import time
from typing import Any

from actors.runtime.kv import Bucket
from bus_schemas import catalog
from bus_schemas import messages as m
from bus_schemas.governor import KILL_KEY, KillFlag, encode_kill
from tests.harness import Bus, Collector, RecordingServer, config_toml, start_crew

# Fast expiry of a released step nobody runs: not_after + step timeout (5 s) + grace.
FAST_EXPIRY = {"approval_ttl_s": 0.5, "slot_grace_s": 0.5}


def diagnosis(*actions: str) -> m.Diagnosis:
    return m.Diagnosis(incident_id=m.new_id(), subject="shop", invariant="latency_p99",
                       hypothesis="pool exhausted", confidence=0.8,
                       actions=[m.RecommendedAction(action=a) for a in actions])


async def crew(bus: Bus, actions: RecordingServer, *names: str, **governor: Any) -> None:
    bus.write_config(config_toml(actions.url, **governor))
    await start_crew(bus, "governor", "planner", *names)


async def plan(col: Collector, d: m.Diagnosis, n: int) -> m.Plan:
    """The incident's n-th plan (1-based), in the order they were published."""
    found = await col.wait_for(lambda e: isinstance(e, m.Plan)
                               and e.incident_id == d.incident_id, timeout=30, count=n)
    return found[n - 1]  # type: ignore[no-any-return]


async def parked(col: Collector, d: m.Diagnosis) -> m.IncidentParked:
    [e] = await col.wait_for(lambda e: isinstance(e, m.IncidentParked)
                             and e.incident_id == d.incident_id, timeout=30)
    return e  # type: ignore[no-any-return]


async def decision(col: Collector, p: m.Plan, outcome: str) -> m.Decision:
    [d] = await col.wait_for(lambda e: isinstance(e, m.Decision) and e.plan_id == p.plan_id
                             and e.outcome == outcome, timeout=30)
    return d  # type: ignore[no-any-return]


async def escalation(col: Collector, d: m.Diagnosis) -> m.IncidentEscalated:
    [e] = await col.wait_for(lambda e: isinstance(e, m.IncidentEscalated)
                             and e.incident_id == d.incident_id, timeout=30)
    return e  # type: ignore[no-any-return]


async def engage_kill(bus: Bus) -> None:
    nc = await bus.connect(catalog.OPERATOR)
    gkv = Bucket(await nc.jetstream().key_value(catalog.GOVERNOR_BUCKET))
    await gkv.put(KILL_KEY, encode_kill(KillFlag(engaged=True, by="test", reason="drill",
                                                 at=time.time())))


async def test_a_vetoed_step_moves_its_incident_to_the_next_alternative(
        bus: Bus, actions: RecordingServer) -> None:
    await crew(bus, actions, allow={"shop": ["enable_cache"]})
    d = diagnosis("recycle_pool", "enable_cache")
    async with bus.collect() as col:
        await bus.publish("diagnoser", d)
        vetoed = await decision(col, await plan(col, d, 1), "vetoed")
        p2 = await plan(col, d, 2)
    assert vetoed.ends_step and p2.steps[0].action == "enable_cache"


async def test_a_denied_step_moves_its_incident_to_the_next_alternative(
        bus: Bus, actions: RecordingServer) -> None:
    await crew(bus, actions, mode="approve")
    d = diagnosis("recycle_pool", "enable_cache")
    async with bus.collect() as col:
        await bus.publish("diagnoser", d)
        waiting = await decision(col, await plan(col, d, 1), "awaiting_approval")
        assert not waiting.ends_step
        await bus.publish(catalog.OPERATOR, m.HumanApproval(
            execution_id=waiting.execution_id, approved=False, by="carol"))
        p2 = await plan(col, d, 2)
    assert p2.steps[0].action == "enable_cache"


async def test_an_approval_that_timed_out_moves_its_incident_to_the_next_alternative(
        bus: Bus, actions: RecordingServer) -> None:
    await crew(bus, actions, mode="approve", approval_timeout_s=1.0)
    d = diagnosis("recycle_pool", "enable_cache")
    async with bus.collect() as col:
        await bus.publish("diagnoser", d)
        denied = await decision(col, await plan(col, d, 1), "denied")
        park = await parked(col, d)
        p2 = await plan(col, d, 2)
    assert denied.ends_step and "no human decision within 1s" in denied.reason
    # Nobody looked: not a "no". It waits, then asks a human again for the same action.
    assert park.obstacle == "approval" and p2.steps[0].action == "recycle_pool"


async def test_a_step_revoked_while_awaiting_approval_moves_its_incident_on(
        bus: Bus, actions: RecordingServer) -> None:
    await crew(bus, actions, mode="approve")
    d = diagnosis("recycle_pool", "enable_cache")
    async with bus.collect() as col:
        await bus.publish("diagnoser", d)
        waiting = await decision(col, await plan(col, d, 1), "awaiting_approval")
        await bus.publish(catalog.OPERATOR, m.ControlCommand(
            command="revoke", execution_id=waiting.execution_id, by="dave"))
        p2 = await plan(col, d, 2)
    revoked = [e for e in col.events(m.Decision) if e.outcome == "revoked"]
    assert [r.ends_step for r in revoked] == [True]
    assert p2.steps[0].action == "enable_cache"


async def test_a_released_step_no_executor_reported_on_expires_and_moves_its_incident_on(
        bus: Bus, actions: RecordingServer) -> None:
    await crew(bus, actions, **FAST_EXPIRY)  # no executor runs
    d = diagnosis("recycle_pool", "enable_cache")
    async with bus.collect() as col:
        await bus.publish("diagnoser", d)
        p1 = await plan(col, d, 1)
        [approved] = await col.wait_for(lambda e: isinstance(e, m.ExecutionApproved)
                                        and e.plan_id == p1.plan_id)
        expired = await decision(col, p1, "expired")
        park = await parked(col, d)
        p2 = await plan(col, d, 2)
    assert expired.ends_step and expired.execution_id == approved.execution_id
    # Nobody ran it: an obstacle, not a failed fix. The same action is tried again.
    assert park.obstacle == "expired" and p2.steps[0].action == "recycle_pool"
    assert actions.count() == 0


async def test_a_step_revoked_after_release_that_nobody_ran_expires_and_moves_on(
        bus: Bus, actions: RecordingServer) -> None:
    await crew(bus, actions, **FAST_EXPIRY)
    d = diagnosis("recycle_pool", "enable_cache")
    async with bus.collect() as col:
        await bus.publish("diagnoser", d)
        p1 = await plan(col, d, 1)
        [approved] = await col.wait_for(lambda e: isinstance(e, m.ExecutionApproved)
                                        and e.plan_id == p1.plan_id)
        await bus.publish(catalog.OPERATOR, m.ControlCommand(
            command="revoke", execution_id=approved.execution_id, by="erin"))
        revoked = await decision(col, p1, "revoked")
        assert not revoked.ends_step  # released: an executor may still report on it
        # Nobody ran it: the step ends when its slot runs out, as the revocation it was.
        [ended] = await col.wait_for(lambda e: isinstance(e, m.Decision) and e.ends_step
                                     and e.plan_id == p1.plan_id, timeout=30)
        p2 = await plan(col, d, 2)
    assert ended.outcome == "revoked" and "no executor ran it" in ended.reason
    assert p2.steps[0].action == "enable_cache"  # the human's "no" holds


async def test_a_step_planned_while_killed_is_vetoed_and_its_incident_parks(
        bus: Bus, actions: RecordingServer) -> None:
    await crew(bus, actions)
    await engage_kill(bus)
    d = diagnosis("recycle_pool", "enable_cache")
    async with bus.collect() as col:
        await bus.publish("diagnoser", d)
        v1 = await decision(col, await plan(col, d, 1), "vetoed")
        park = await parked(col, d)
    assert v1.reason == "kill switch engaged" and v1.ends_step
    assert park.obstacle == "kill" and park.attempt <= 1  # no attempt used
    assert not [e for e in col.events(m.IncidentEscalated) if e.incident_id == d.incident_id]


async def test_a_step_killed_after_release_that_nobody_ran_expires_and_parks(
        bus: Bus, actions: RecordingServer) -> None:
    await crew(bus, actions, **FAST_EXPIRY)
    d = diagnosis("recycle_pool")
    async with bus.collect() as col:
        await bus.publish("diagnoser", d)
        p1 = await plan(col, d, 1)
        await col.wait_for(lambda e: isinstance(e, m.ExecutionApproved)
                           and e.plan_id == p1.plan_id)
        await engage_kill(bus)
        killed = await decision(col, p1, "killed")
        assert not killed.ends_step
        await decision(col, p1, "expired")
        park = await parked(col, d)
    assert park.obstacle == "expired" and actions.count() == 0
    assert not [e for e in col.events(m.IncidentEscalated) if e.incident_id == d.incident_id]
