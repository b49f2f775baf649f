"""The planner: its pure state machine, then the real actor process on a real bus."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from aiohttp import web

from actors.planner.attempts import IncidentState, Rules, apply, plan_id_for
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from subjects.base import ActionSpec, NoParams
from tests.harness import Bus, Collector

# --- the pure state machine -------------------------------------------------------------

SPECS = {
    "recycle_pool": ActionSpec("recycle_pool", "", NoParams, risk="low", idempotent=True,
                               timeout_s=5.0),
    "restart_worker": ActionSpec("restart_worker", "", NoParams, risk="medium",
                                 idempotent=False, timeout_s=10.0),
    "enable_cache": ActionSpec("enable_cache", "", NoParams, risk="low", idempotent=True),
}
RULES = Rules(max_attempts=3, spec_for=lambda _subject, action: SPECS.get(action))


def diagnosis(incident: str, *actions: str, escalate: bool = False,
              hypothesis: str = "pool exhausted") -> m.Diagnosis:
    return m.Diagnosis(incident_id=incident, subject="webshop", invariant="latency_p99",
                       hypothesis=hypothesis, confidence=0.8, escalate=escalate,
                       actions=[m.RecommendedAction(action=a, rationale=f"try {a}")
                                for a in actions])


def verdict(incident: str, plan_id: str, passed: bool = False) -> m.Verdict:
    return m.Verdict(incident_id=incident, subject="webshop", plan_id=plan_id,
                     invariant="latency_p99", passed=passed, reason="p99 still 900 ms")


def run(events: list[m.Event], rules: Rules = RULES) -> tuple[IncidentState | None, list[Any]]:
    state: IncidentState | None = None
    out: list[Any] = []
    for e in events:
        step = apply(state, e, rules)
        if step is not None:
            state = step.state
            out += step.events
    return state, out


def test_diagnosis_gives_one_step_plan_of_the_top_action() -> None:
    state, out = run([diagnosis("i1", "restart_worker", "recycle_pool")])
    [plan] = out
    assert isinstance(plan, m.Plan) and plan.attempt == 1
    assert plan.plan_id == plan_id_for("i1", 1) and plan.id == plan.plan_id
    [step] = plan.steps
    assert (step.action, step.risk, step.idempotent, step.timeout_s) == (
        "restart_worker", "medium", False, 10.0)
    assert state is not None and [a.action for a in state.alternatives] == ["recycle_pool"]


def test_failure_signals_of_the_current_plan_move_to_next_alternative() -> None:
    d = diagnosis("i1", "recycle_pool", "restart_worker", "enable_cache")
    p1 = plan_id_for("i1", 1)
    p2 = plan_id_for("i1", 2)
    _, out = run([
        d,
        m.Decision(incident_id="i1", outcome="awaiting_approval", reason="risk", plan_id=p1),
        m.ExecutionResult(incident_id="i1", execution_id="x", plan_id=p1,
                          action="recycle_pool", status="succeeded"),
        m.ExecutionResult(incident_id="i1", execution_id="x", plan_id=p1,
                          action="recycle_pool", status="timed_out"),
        verdict("i1", p1),  # stale: plan 2 is current now
        m.Decision(incident_id="i1", outcome="vetoed", reason="rate limit", plan_id=p2),
    ])
    assert [(p.attempt, p.steps[0].action) for p in out] == [
        (1, "recycle_pool"), (2, "restart_worker"), (3, "enable_cache")]
    assert "timed_out" in out[1].rationale and "vetoed" in out[2].rationale


def test_a_decision_that_ends_the_step_moves_on_and_one_that_does_not_waits() -> None:
    d = diagnosis("i1", "recycle_pool", "restart_worker", "enable_cache")
    p1, p2 = plan_id_for("i1", 1), plan_id_for("i1", 2)
    _, out = run([
        d,
        # A released step that is killed or revoked ends in its executor's result.
        m.Decision(incident_id="i1", outcome="killed", reason="kill", plan_id=p1),
        m.Decision(incident_id="i1", outcome="revoked", reason="by ana", plan_id=p1),
        # Revoked before release: no result will follow, the Decision is the end.
        m.Decision(incident_id="i1", outcome="revoked", reason="by ana", plan_id=p1,
                   ends_step=True),
        # Released, but nobody reported before its slot ran out.
        m.Decision(incident_id="i1", outcome="expired", reason="unreported", plan_id=p2,
                   ends_step=True),
    ])
    assert [(p.attempt, p.steps[0].action) for p in out] == [
        (1, "recycle_pool"), (2, "restart_worker"), (3, "enable_cache")]
    assert "governor revoked" in out[1].rationale and "governor expired" in out[2].rationale


@pytest.mark.parametrize("status", ["skipped", "unknown", "cancelled"])
def test_an_executor_side_ending_moves_on_then_escalates(status: str) -> None:
    """skipped (kill, revocation or expiry before the start), unknown (a crash
    mid-effect), cancelled (kill or revocation while running)."""
    d = diagnosis("i1", "recycle_pool", "enable_cache")
    state, out = run([d] + [
        m.ExecutionResult(incident_id="i1", execution_id=f"x{n}", plan_id=plan_id_for("i1", n),
                          action="a", status=status)  # type: ignore[arg-type]
        for n in (1, 2)])
    assert [type(e).__name__ for e in out] == ["Plan", "Plan", "IncidentEscalated"]
    assert status in out[-1].reason and state is not None and state.closed == "escalated"


def test_unregistered_action_is_skipped() -> None:
    _, out = run([diagnosis("i1", "format_disk", "recycle_pool")])
    assert [p.steps[0].action for p in out] == ["recycle_pool"]


def test_max_attempts_then_escalation_and_nothing_after() -> None:
    rules = Rules(max_attempts=2, spec_for=RULES.spec_for)
    d = diagnosis("i1", "recycle_pool", "restart_worker", "enable_cache")
    state, out = run([d, verdict("i1", plan_id_for("i1", 1)),
                      verdict("i1", plan_id_for("i1", 2)),
                      verdict("i1", plan_id_for("i1", 2))], rules)
    assert [type(e).__name__ for e in out] == ["Plan", "Plan", "IncidentEscalated"]
    esc = out[-1]
    assert esc.attempts == 2 and "2 attempt(s) failed" in esc.reason
    assert state is not None and state.closed == "escalated"


def test_running_out_of_alternatives_escalates() -> None:
    _, out = run([diagnosis("i1", "recycle_pool"), verdict("i1", plan_id_for("i1", 1))])
    assert isinstance(out[-1], m.IncidentEscalated) and "no alternative" in out[-1].reason


def test_escalating_or_empty_diagnosis_escalates_without_plan() -> None:
    _, out = run([diagnosis("i1", "recycle_pool", escalate=True)])
    assert [type(e) for e in out] == [m.IncidentEscalated] and out[0].attempts == 0
    _, out = run([diagnosis("i2")])
    assert [type(e) for e in out] == [m.IncidentEscalated]


def test_resolved_or_verified_incident_is_closed() -> None:
    resolved = m.IncidentResolved(incident_id="i1", subject="webshop",
                                  invariant="latency_p99", reason="holds again")
    _, out = run([resolved, diagnosis("i1", "recycle_pool")])
    assert out == []
    state, out = run([diagnosis("i1", "recycle_pool", "restart_worker"),
                      verdict("i1", plan_id_for("i1", 1), passed=True),
                      verdict("i1", plan_id_for("i1", 1))])
    assert len(out) == 1 and state is not None and state.closed == "verified"


def test_a_later_diagnosis_does_not_restart_the_count() -> None:
    _, out = run([diagnosis("i1", "recycle_pool"), diagnosis("i1", "restart_worker")])
    assert len(out) == 1


# --- the actor process on a real bus --------------------------------------------------


def bus_diagnosis(*actions: str, incident: str | None = None,
                  escalate: bool = False) -> m.Diagnosis:
    return diagnosis(incident or m.new_id(), *actions, escalate=escalate)


def plans_of(col: Collector, incident: str) -> list[m.Plan]:
    return [p for p in col.events(m.Plan) if p.incident_id == incident]


async def next_plan(col: Collector, incident: str, attempt: int) -> m.Plan:
    found = await col.wait_for(lambda e: isinstance(e, m.Plan) and e.incident_id == incident
                               and e.attempt == attempt)
    plan: m.Plan = found[0]
    return plan


async def barrier(bus: Bus, col: Collector) -> None:
    """Wait until the planner has handled everything published so far.

    The planner handles its consumer in stream order, so once a plan for a
    fresh sentinel incident appears, every earlier input has been handled:
    absence can be asserted without sleeping.
    """
    sentinel = bus_diagnosis("recycle_pool")
    await bus.publish("diagnoser", sentinel)
    # Its own plan, or one that follows a remediation already under way (same action).
    await col.wait_for(lambda e: isinstance(e, m.Plan) and e.incident_id == sentinel.incident_id)


async def start_planner(bus: Bus) -> Any:
    proc = bus.spawn("planner")
    await bus.wait_heartbeat("planner")
    return proc


@dataclass
class Hook:
    url: str
    received: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def webhook_server(hang: bool = False) -> AsyncIterator[Hook]:
    """A real HTTP endpoint on loopback that records escalation POSTs."""
    hook = Hook("")

    async def receive(request: web.Request) -> web.Response:
        hook.received.append((dict(request.headers), await request.json()))
        hook.arrived.set()
        if hang:
            await asyncio.sleep(60)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield hook
    finally:
        await runner.cleanup()


@pytest.mark.e2e
async def test_diagnosis_becomes_plan_attempt_one(bus: Bus) -> None:
    from subjects import load

    specs = load("webshop").actions
    await start_planner(bus)
    async with bus.collect() as col:
        d = bus_diagnosis("restart_worker", "recycle_pool")
        await bus.publish("diagnoser", d)
        plan = await next_plan(col, d.incident_id, 1)
    [step] = plan.steps
    spec = specs["restart_worker"]
    assert plan.producer == "planner" and plan.causation_id == d.id
    assert (step.action, step.risk, step.idempotent, step.timeout_s) == (
        "restart_worker", spec.risk, spec.idempotent, spec.timeout_s)


@pytest.mark.e2e
async def test_failed_verdict_gives_attempt_two_with_next_alternative(bus: Bus) -> None:
    await start_planner(bus)
    async with bus.collect() as col:
        d = bus_diagnosis("recycle_pool", "failover_dependency", "restart_worker")
        await bus.publish("diagnoser", d)
        p1 = await next_plan(col, d.incident_id, 1)
        await bus.publish("verifier", verdict(d.incident_id, p1.plan_id))
        p2 = await next_plan(col, d.incident_id, 2)
    assert p2.steps[0].action == "failover_dependency" and p2.plan_id != p1.plan_id


@pytest.mark.e2e
async def test_veto_moves_on_but_awaiting_approval_waits(bus: Bus) -> None:
    await start_planner(bus)
    async with bus.collect() as col:
        d = bus_diagnosis("scale_pool", "recycle_pool")
        d = msgspec.structs.replace(d, actions=[
            m.RecommendedAction(action="scale_pool", params={"size": 16}),
            m.RecommendedAction(action="recycle_pool")])
        await bus.publish("diagnoser", d)
        p1 = await next_plan(col, d.incident_id, 1)
        assert p1.steps[0].params == {"size": 16}
        await bus.publish("governor", m.Decision(
            incident_id=d.incident_id, subject="webshop", outcome="awaiting_approval",
            reason="medium risk needs a human", plan_id=p1.plan_id))
        await barrier(bus, col)
        assert len(plans_of(col, d.incident_id)) == 1
        await bus.publish("governor", m.Decision(
            incident_id=d.incident_id, subject="webshop", outcome="vetoed",
            reason="rate limit", plan_id=p1.plan_id))
        p2 = await next_plan(col, d.incident_id, 2)
    assert p2.steps[0].action == "recycle_pool" and "vetoed" in p2.rationale


@pytest.mark.e2e
async def test_max_attempts_escalates_and_posts_the_webhook(bus: Bus) -> None:
    async with webhook_server() as hook:
        bus.write_config(f'[planner]\nmax_attempts = 2\nescalation_webhook = "{hook.url}"\n')
        await start_planner(bus)
        async with bus.collect() as col:
            d = bus_diagnosis("recycle_pool", "failover_dependency", "restart_worker")
            await bus.publish("diagnoser", d)
            p1 = await next_plan(col, d.incident_id, 1)
            await bus.publish("executor", m.ExecutionResult(
                incident_id=d.incident_id, subject="webshop", execution_id=m.new_id(),
                plan_id=p1.plan_id, action="recycle_pool", status="failed",
                detail="HTTP 500"))
            p2 = await next_plan(col, d.incident_id, 2)
            await bus.publish("verifier", verdict(d.incident_id, p2.plan_id))
            [esc] = await col.wait_for(lambda e: isinstance(e, m.IncidentEscalated)
                                       and e.incident_id == d.incident_id)
            await asyncio.wait_for(hook.arrived.wait(), 20)
        assert esc.attempts == 2 and "2 attempt(s) failed" in esc.reason
        assert len(plans_of(col, d.incident_id)) == 2
        headers, body = hook.received[0]
        assert body["incident_id"] == d.incident_id and body["attempts"] == 2
        assert body["id"] == esc.id and headers["Idempotency-Key"] == esc.id
        assert body["reason"] == esc.reason and d.incident_id in body["text"]


@pytest.mark.e2e
async def test_escalating_diagnosis_escalates_without_a_plan(bus: Bus) -> None:
    await start_planner(bus)
    async with bus.collect() as col:
        d = bus_diagnosis(escalate=True)
        await bus.publish("diagnoser", d)
        [esc] = await col.wait_for(lambda e: isinstance(e, m.IncidentEscalated)
                                   and e.incident_id == d.incident_id)
        await barrier(bus, col)
    assert esc.attempts == 0 and "asks for a human" in esc.reason
    assert plans_of(col, d.incident_id) == []


@pytest.mark.e2e
async def test_resolved_incident_gets_no_further_plan(bus: Bus) -> None:
    await start_planner(bus)
    async with bus.collect() as col:
        d = bus_diagnosis("recycle_pool", "restart_worker")
        await bus.publish("diagnoser", d)
        p1 = await next_plan(col, d.incident_id, 1)
        await bus.publish("detector", m.IncidentResolved(
            incident_id=d.incident_id, subject="webshop", invariant="latency_p99",
            reason="p99 back under 250 ms"))
        await bus.publish("verifier", verdict(d.incident_id, p1.plan_id))
        await barrier(bus, col)
    assert [p.attempt for p in plans_of(col, d.incident_id)] == [1]
    assert not [e for e in col.events(m.IncidentEscalated) if e.incident_id == d.incident_id]


@pytest.mark.e2e
async def test_webhook_that_hangs_does_not_block_planning(bus: Bus) -> None:
    async with webhook_server(hang=True) as hook:
        bus.write_config(f'[planner]\nescalation_webhook = "{hook.url}"\n')
        await start_planner(bus)
        async with bus.collect() as col:
            d = bus_diagnosis(escalate=True)
            await bus.publish("diagnoser", d)
            await asyncio.wait_for(hook.arrived.wait(), 20)
            await barrier(bus, col)  # planned while the POST still hangs
        assert len(hook.received) == 1


async def _settled(bus: Bus) -> None:
    """Until the planner has acked everything: a kill then loses no in-flight input."""
    nc = await bus.connect(catalog.ADMIN)
    js = nc.jetstream()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = await js.consumer_info(catalog.EVENTS_STREAM, "planner")
        if info.num_ack_pending == 0 and info.num_pending == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("planner never caught up")


@pytest.mark.e2e
async def test_restarted_planner_keeps_its_attempt_count(bus: Bus) -> None:
    first = await start_planner(bus)
    async with bus.collect() as col:
        d = bus_diagnosis("recycle_pool", "failover_dependency", "restart_worker")
        await bus.publish("diagnoser", d)
        p1 = await next_plan(col, d.incident_id, 1)
        await _settled(bus)
        first.kill()
        await start_planner(bus)
        # A second diagnosis of the same incident must not start over at attempt 1.
        await bus.publish("diagnoser", bus_diagnosis("enable_cache", incident=d.incident_id))
        await bus.publish("verifier", verdict(d.incident_id, p1.plan_id))
        p2 = await next_plan(col, d.incident_id, 2)
        await barrier(bus, col)
    assert p2.steps[0].action == "failover_dependency"
    assert [p.attempt for p in plans_of(col, d.incident_id)] == [1, 2]


@pytest.mark.e2e
async def test_redelivered_input_republishes_the_same_plan_only(bus: Bus) -> None:
    await start_planner(bus)
    async with bus.collect() as col:
        d = bus_diagnosis("recycle_pool", "restart_worker")
        await bus.publish("diagnoser", d)
        p1 = await next_plan(col, d.incident_id, 1)
        # The same message again without its Nats-Msg-Id: the stream keeps the
        # copy, so the planner sees an input it has already applied.
        copy = msgspec.structs.replace(d, producer="diagnoser")
        await bus.publish_raw(catalog.bus_subject_of(copy), codec.encode(copy))
        await barrier(bus, col)
    plans = plans_of(col, d.incident_id)
    assert {(p.id, p.attempt) for p in plans} == {(p1.id, 1)}

