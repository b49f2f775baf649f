"""The verifier as a real process: incidents and plan endings published as their
producers (detector, governor), observations as the monitor."""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats.errors
import pytest

from bus_schemas import catalog, codec
from bus_schemas import messages as m
from subjects.base import InvariantSpec, SubjectDefinition
from tests.harness import SHOP as SUBJECT
from tests.harness import SHOP_CONFIG as CONFIG
from tests.harness import Bus, Feed, breaking_value, latency, webshop

pytestmark = pytest.mark.timeout(60)
STABLE_S = 2.0  # as in CONFIG


async def open_incident(bus: Bus, spec: InvariantSpec) -> str:
    incident_id = m.new_id()
    await bus.publish("detector", m.IncidentOpened(
        incident_id=incident_id, subject=SUBJECT, invariant=spec.name, summary="test",
        value=breaking_value(spec), threshold=spec.threshold))
    return incident_id


async def finish(bus: Bus, incident_id: str, status: m.ExecutionStatus = "succeeded",
                 plan_id: str = "plan-1") -> m.PlanEnded:
    """The governor's word that the plan's one step ended with `status`."""
    now = time.time()
    ending = m.StepEnding(step_id="s1", action="restart", ended=status, released=True)
    ended = m.PlanEnded(incident_id=incident_id, subject=SUBJECT, plan_id=plan_id,
                        outcome="succeeded" if status == "succeeded" else "failed",
                        steps=[ending], deciding=None if status == "succeeded" else ending,
                        started_at=now - 1, finished_at=now)
    await bus.publish("governor", ended)
    return ended


async def start_verifier(bus: Bus) -> None:
    bus.write_config(CONFIG)
    bus.spawn("verifier")
    await bus.wait_heartbeat("verifier")


def other_threshold(defn: SubjectDefinition, spec: InvariantSpec) -> InvariantSpec:
    return next(s for s in defn.invariants if s.kind == "threshold" and s.name != spec.name)


async def test_passes_after_a_stable_window_of_fresh_healthy_observations(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    await start_verifier(bus)
    nc = await bus.connect("monitor")
    async with bus.collect(catalog.under("verdict")) as col:
        incident_id = await open_incident(bus, spec)
        result = await finish(bus, incident_id)
        # Healthy, but from before the execution finished: they prove nothing.
        await Feed(nc, defn, start=result.finished_at - 20).many(19)
        fresh = Feed(nc, defn, start=result.finished_at + 0.5, step=0.5)
        await fresh.many(4, {spec.metric: breaking_value(spec)})
        await fresh.many(int(STABLE_S / 0.5))  # healthy, one step short of the window
        await asyncio.sleep(1.5)
        assert col.events(m.Verdict) == []
        await fresh.many(2)
        [verdict] = await col.wait_for(lambda e: isinstance(e, m.Verdict))
        await asyncio.sleep(1.0)
    assert verdict.passed, verdict.reason
    assert (verdict.invariant, verdict.plan_id) == (spec.name, result.plan_id)
    assert verdict.incident_id == incident_id and verdict.causation_id == result.id
    assert len(col.events(m.Verdict)) == 1


async def test_fails_at_the_deadline_while_still_broken(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    await start_verifier(bus)
    feed = Feed(await bus.connect("monitor"), defn)

    async def keep_broken() -> None:
        while True:  # a real-time scrape schedule, 0.5 s apart
            feed.ts = time.time()
            await feed.send({spec.metric: breaking_value(spec)})
            await asyncio.sleep(0.5)

    async with bus.collect(catalog.under("verdict")) as col:
        incident_id = await open_incident(bus, spec)
        result = await finish(bus, incident_id)
        pump = asyncio.create_task(keep_broken())
        try:
            [verdict] = await col.wait_for(lambda e: isinstance(e, m.Verdict), timeout=30)
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
    assert not verdict.passed
    assert "did not hold" in verdict.reason and spec.name in verdict.reason
    assert verdict.ts >= result.finished_at + 6.0  # deadline_s in CONFIG


async def test_resolution_passes_a_check_and_other_statuses_get_no_verdict(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    await start_verifier(bus)
    feed = Feed(await bus.connect("monitor"), defn, start=time.time())
    async with bus.collect(catalog.under("verdict")) as col:
        failed_incident = await open_incident(bus, spec)
        await finish(bus, failed_incident, status="failed", plan_id="plan-failed")
        incident_id = await open_incident(bus, spec)
        result = await finish(bus, incident_id)
        await feed.many(3, {spec.metric: breaking_value(spec)})
        await asyncio.sleep(0.5)
        await bus.publish("detector", m.IncidentResolved(
            incident_id=incident_id, subject=SUBJECT, invariant=spec.name, reason="test"))
        [verdict] = await col.wait_for(lambda e: isinstance(e, m.Verdict))
        await asyncio.sleep(1.0)
    assert verdict.passed and "resolved" in verdict.reason
    assert verdict.causation_id == result.id
    assert [v.plan_id for v in col.events(m.Verdict)] == [result.plan_id]


async def wait_busy(bus: Bus, within_s: float = 15.0) -> None:
    """Until the verifier's heartbeat shows a message in its hands."""
    nc = await bus.connect(catalog.OPERATOR)
    sub = await nc.subscribe(catalog.subject_for(m.Heartbeat, actor="verifier"))
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(nats.errors.TimeoutError):
                beat = codec.decode((await sub.next_msg(timeout=0.5)).data, (m.Heartbeat,))
                assert isinstance(beat, m.Heartbeat)
                if beat.in_flight >= 1:
                    return
        raise AssertionError("the verifier never started the check")
    finally:
        await sub.unsubscribe()


async def test_a_stopped_verifier_hands_the_check_back_and_remembers_the_incident(
    bus: Bus,
) -> None:
    defn = await webshop()
    spec = latency(defn)
    other = other_threshold(defn, spec)
    bus.write_config(CONFIG)
    first = bus.spawn("verifier")
    await bus.wait_heartbeat("verifier")
    nc = await bus.connect("monitor")
    async with bus.collect(catalog.under("verdict")) as col:
        incident_id = await open_incident(bus, spec)
        result = await finish(bus, incident_id)
        await Feed(nc, defn).many(2, {spec.metric: breaking_value(spec)})
        await wait_busy(bus)
        assert first.terminate() == 0  # SIGTERM mid-check: handed back, not finished
        assert col.events(m.Verdict) == []
        started = time.time()
        bus.spawn("verifier")
        await bus.wait_heartbeat("verifier", after=started)
        # The incident's own invariant holds; another one is broken. Only a verifier
        # that remembers which invariant the incident is about passes this.
        feed = Feed(nc, defn, start=max(time.time(), result.finished_at + 0.1), step=0.5)
        await feed.many(int(STABLE_S / 0.5) + 3, {other.metric: breaking_value(other)})
        [verdict] = await col.wait_for(lambda e: isinstance(e, m.Verdict))
    assert verdict.passed and verdict.invariant == spec.name, verdict.reason
    assert "unknown" not in verdict.reason


async def test_a_recovery_before_the_step_started_passes_without_credit(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    await start_verifier(bus)
    nc = await bus.connect("monitor")
    async with bus.collect(catalog.under("verdict")) as col:
        incident_id = await open_incident(bus, spec)
        now = time.time()
        # The fault cleared by itself: healthy for the whole window before the step started.
        await Feed(nc, defn, start=now - 6, step=0.5).many(10)
        result = await finish(bus, incident_id)  # started 1 s before it finished
        await Feed(nc, defn, start=result.finished_at + 0.5, step=0.5).many(6)
        [verdict] = await col.wait_for(lambda e: isinstance(e, m.Verdict))
    assert verdict.passed and verdict.recovered == "before", verdict
    assert "already recovered before the step started" in verdict.reason


async def test_a_fix_that_cured_a_broken_invariant_gets_the_credit(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    await start_verifier(bus)
    nc = await bus.connect("monitor")
    async with bus.collect(catalog.under("verdict")) as col:
        incident_id = await open_incident(bus, spec)
        now = time.time()
        await Feed(nc, defn, start=now - 4, step=0.5).many(6, {spec.metric: breaking_value(spec)})
        result = await finish(bus, incident_id)
        await Feed(nc, defn, start=result.finished_at + 0.5, step=0.5).many(6)
        [verdict] = await col.wait_for(lambda e: isinstance(e, m.Verdict))
    assert verdict.passed and verdict.recovered == "after", verdict


async def test_a_resolution_before_the_step_finished_is_not_the_fixs_credit(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    await start_verifier(bus)
    async with bus.collect(catalog.under("verdict")) as col:
        incident_id = await open_incident(bus, spec)
        await bus.publish("detector", m.IncidentResolved(
            incident_id=incident_id, subject=SUBJECT, invariant=spec.name, reason="cleared"))
        await asyncio.sleep(0.5)  # the verifier records the resolution first
        await finish(bus, incident_id)
        [verdict] = await col.wait_for(lambda e: isinstance(e, m.Verdict))
    assert verdict.passed and verdict.recovered == "before", verdict
    assert "not thanks to it" in verdict.reason


async def test_the_deadline_waits_while_observations_are_missing(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    await start_verifier(bus)
    feed = Feed(await bus.connect("monitor"), defn)
    async with bus.collect(catalog.under("verdict")) as col:
        incident_id = await open_incident(bus, spec)
        result = await finish(bus, incident_id)
        # No observation at all for longer than the deadline (6 s): the monitor is down.
        await asyncio.sleep(8.0)
        assert col.events(m.Verdict) == [], "the deadline ran out without any evidence"
        feed.ts = time.time()
        feed.step = 0.5
        await feed.many(6)  # it comes back healthy
        [verdict] = await col.wait_for(lambda e: isinstance(e, m.Verdict))
    assert verdict.passed and not verdict.inconclusive, verdict
    assert verdict.causation_id == result.id


async def test_a_check_without_evidence_ends_inconclusive_not_failed(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    bus.write_config(CONFIG + "evidence_wait_s = 4.0\n")
    bus.spawn("verifier")
    await bus.wait_heartbeat("verifier")
    async with bus.collect(catalog.under("verdict")) as col:
        incident_id = await open_incident(bus, spec)
        await finish(bus, incident_id)
        [verdict] = await col.wait_for(lambda e: isinstance(e, m.Verdict), timeout=40)
    assert verdict.inconclusive and not verdict.passed, verdict
    assert "inconclusive: no observation of" in verdict.reason
