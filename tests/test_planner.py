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

from actors.planner.attempts import (
    IncidentState,
    Rules,
    SubjectIndex,
    apply,
    diagnosis_overdue,
    plan_id_for,
    recurrence,
)
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from subjects.base import ActionSpec, NoParams
from tests.harness import Bus, Collector, governed, spawn_stopping, wait_stopped

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
    return run_from(None, events, rules)


def test_diagnosis_gives_one_step_plan_of_the_top_action() -> None:
    state, out = run([diagnosis("i1", "restart_worker", "recycle_pool")])
    [plan] = out
    assert isinstance(plan, m.Plan) and plan.attempt == 1
    assert plan.plan_id == plan_id_for("i1", 1) and plan.id == plan.plan_id
    [step] = plan.steps
    assert (step.action, step.risk, step.idempotent, step.timeout_s) == (
        "restart_worker", "medium", False, 10.0)
    assert state is not None and [a.action for a in state.alternatives] == ["recycle_pool"]


def answer(req: m.DiagnosisRequested, *actions: str, escalate: bool = False,
           symptoms: dict[str, float] | None = None) -> m.Diagnosis:
    """The diagnoser's fresh diagnosis answering `req`."""
    return m.Diagnosis(incident_id=req.incident_id, subject="webshop", invariant=req.invariant,
                       hypothesis="fresh look", confidence=0.8, escalate=escalate,
                       request_id=req.id, symptoms=symptoms or {"p99_ms": 900.0},
                       actions=[m.RecommendedAction(action=a) for a in actions])


def kinds(out: list[Any]) -> list[str]:
    return [type(e).__name__ for e in out]


def test_a_failed_attempt_asks_for_a_fresh_diagnosis_and_plans_from_its_answer() -> None:
    d = diagnosis("i1", "recycle_pool", "restart_worker", "enable_cache")
    p1 = plan_id_for("i1", 1)
    state, out = run([
        d,
        m.Decision(incident_id="i1", outcome="awaiting_approval", reason="risk", plan_id=p1),
        m.ExecutionResult(incident_id="i1", execution_id="x", plan_id=p1,
                          action="recycle_pool", status="succeeded"),
        verdict("i1", p1),
    ])
    assert kinds(out) == ["Plan", "DiagnosisRequested"]
    req = out[-1]
    assert req.attempt == 2 and "verdict failed" in req.reason
    [h] = req.history
    assert (h.attempt, h.action, h.outcome) == (1, "recycle_pool", "verdict_failed")
    # The first diagnosis's leftovers are not used: the answer names enable_cache.
    late = answer(msgspec.structs.replace(req, id="old-request"), "restart_worker")
    state, out2 = run_from(state, [late, answer(req, "enable_cache")])
    assert kinds(out2) == ["Plan"] and out2[0].steps[0].action == "enable_cache"
    assert out2[0].attempt == 2 and state is not None
    assert state.history[0].symptoms_after == {"p99_ms": 900.0}


def run_from(state: IncidentState | None, events: list[m.Event],
             rules: Rules = RULES, now: float = 0.0) -> tuple[IncidentState | None, list[Any]]:
    out: list[Any] = []
    for raw in events:
        e = governed(raw)
        step = apply(state, e, rules, now) if e is not None else None
        if step is not None:
            state = step.state
            out += step.events
    return state, out


@pytest.mark.parametrize("status", ["failed", "timed_out", "unknown"])
def test_a_step_that_ran_and_failed_uses_an_attempt(status: str) -> None:
    rules = Rules(max_attempts=2, spec_for=RULES.spec_for)
    state, out = run([diagnosis("i1", "recycle_pool", "enable_cache")], rules)
    for n in (1, 2):
        state, more = run_from(state, [m.ExecutionResult(
            incident_id="i1", execution_id=f"x{n}", plan_id=plan_id_for("i1", n),
            action="a", status=status)], rules)  # type: ignore[arg-type]
        out += more
        if isinstance(more[-1], m.DiagnosisRequested):
            state, more = run_from(state, [answer(more[-1], "enable_cache")], rules)
            out += more
    assert kinds(out) == ["Plan", "DiagnosisRequested", "Plan", "IncidentEscalated"]
    assert status in out[-1].reason and out[-1].attempts == 2
    assert state is not None and state.closed == "escalated"


def test_vetoes_under_the_kill_switch_park_without_using_attempts() -> None:
    d = diagnosis("i1", "recycle_pool", "enable_cache")
    state, _ = run([d])
    for n in range(1, 8):  # far more than max_attempts
        state, more = run_from(state, [m.Decision(
            incident_id="i1", outcome="vetoed", reason="kill switch engaged",
            plan_id=plan_id_for("i1", n), ends_step=True)], now=100.0 * n)
        assert kinds(more) == ["IncidentParked"], more
        parked = more[0]
        assert parked.obstacle == "kill" and parked.action == "recycle_pool"
        assert state is not None and state.attempt == 0 and state.parked == "kill"
        state, more = run_from(state, [m.RetryRequested(incident_id="i1", by="ana")])  # or a resume
        [plan] = more
        assert plan.steps[0].action == "recycle_pool" and plan.attempt == 1
        assert plan.plan_id == plan_id_for("i1", n + 1)
    assert state is not None and not state.closed


@pytest.mark.parametrize(("outcome", "reason", "kind"), [
    ("vetoed", "observe mode: nothing executes", "mode"),
    ("vetoed", "rate limit: 6 executions on 'webshop' in the last minute (max 6)", "limit"),
    ("vetoed", "cooldown: 'recycle_pool' on 'webshop' ran 1.0s ago (cooldown 5s)", "limit"),
    ("vetoed", "concurrency limit: 2 executions in flight (max 2)", "limit"),
    ("denied", "denied by the governor: no human decision within 600s", "approval"),
    ("expired", "released, no executor reported", "expired"),
])
def test_obstacles_park_with_a_bounded_backoff(outcome: str, reason: str, kind: str) -> None:
    rules = Rules(max_attempts=3, spec_for=RULES.spec_for, park_retry_s=5, park_retry_max_s=60)
    state, _ = run([diagnosis("i1", "recycle_pool")], rules)
    delays = []
    for n in range(1, 7):
        state, more = run_from(state, [m.Decision(
            incident_id="i1", outcome=outcome, reason=reason,  # type: ignore[arg-type]
            plan_id=plan_id_for("i1", n), ends_step=True)], rules, now=1000.0)
        [parked] = more
        assert parked.obstacle == kind
        delays.append(parked.retry_at - 1000.0)
        assert state is not None
        state, more = run_from(state, [m.RetryRequested(incident_id="i1", by="ana")], rules)
        assert kinds(more) == ["Plan"]
    assert all(0 < d <= 60 for d in delays)
    if kind not in ("kill", "mode"):
        assert delays == sorted(delays) and delays[0] == 5 and delays[-1] == 60


@pytest.mark.parametrize(("event", "what"), [
    (m.Decision(incident_id="i1", outcome="denied", reason="denied by ana: no",
                plan_id=plan_id_for("i1", 1), ends_step=True), "denied"),
    (m.Decision(incident_id="i1", outcome="revoked", reason="revoked by ana",
                plan_id=plan_id_for("i1", 1), ends_step=True), "revoked"),
    (m.Decision(incident_id="i1", outcome="vetoed", plan_id=plan_id_for("i1", 1),
                reason="action 'recycle_pool' is not in the allow-list of 'webshop'",
                ends_step=True), "allow-list"),
    (m.ExecutionResult(incident_id="i1", execution_id="x", plan_id=plan_id_for("i1", 1),
                       action="recycle_pool", status="skipped", detail="revoked by ana: r"),
     "revoked"),
])
def test_a_no_to_an_action_plans_the_next_without_an_attempt(event: m.Event, what: str) -> None:
    state, out = run([diagnosis("i1", "recycle_pool", "enable_cache"), event])
    assert kinds(out) == ["Plan", "Plan"]
    assert out[1].steps[0].action == "enable_cache" and out[1].attempt == 1
    assert what in out[1].rationale
    assert state is not None and state.excluded == ["recycle_pool"]
    # A later fresh diagnosis proposing it again does not bring it back.
    state, more = run_from(state, [verdict("i1", out[1].plan_id)])
    state, more = run_from(state, [answer(more[-1], "recycle_pool")])
    assert kinds(more) == ["IncidentEscalated"] and "nothing not tried" in more[0].reason


@pytest.mark.parametrize(("detail", "kind"), [
    ("kill switch engaged by bob: drill", "kill"),
    ("mode is observe: nothing executes", "mode"),
    ("approved by policy, but the mode is now approve: a human must approve", "mode"),
    ("approval expired 3.0s ago (not_after)", "expired"),
])
@pytest.mark.parametrize("status", ["skipped", "cancelled"])
def test_skips_and_cancellations_by_an_obstacle_park(detail: str, kind: str, status: str) -> None:
    state, out = run([diagnosis("i1", "recycle_pool"), m.ExecutionResult(
        incident_id="i1", execution_id="x", plan_id=plan_id_for("i1", 1),
        action="recycle_pool", status=status, detail=detail)])  # type: ignore[arg-type]
    assert kinds(out) == ["Plan", "IncidentParked"] and out[1].obstacle == kind
    assert state is not None and state.attempt == 0


def test_an_inconclusive_verdict_uses_the_attempt_and_asks_for_a_fresh_look() -> None:
    _, out = run([diagnosis("i1", "recycle_pool", "enable_cache"), msgspec.structs.replace(
        verdict("i1", plan_id_for("i1", 1)), inconclusive=True)])
    assert kinds(out) == ["Plan", "DiagnosisRequested"]
    assert out[1].history[0].outcome == "inconclusive"


def test_a_step_event_is_not_the_planners_input_its_plans_end_is() -> None:
    """The planner acts on PlanEnded alone: a step's own Decision or result (a step of a
    plan still running) changes nothing, whatever it says."""
    state, _ = run([diagnosis("i1", "recycle_pool", "restart_worker")])
    p1 = plan_id_for("i1", 1)
    for raw in (m.ExecutionResult(incident_id="i1", execution_id="x", plan_id=p1,
                                  action="recycle_pool", status="failed"),
                m.Decision(incident_id="i1", outcome="vetoed", reason="kill switch engaged",
                           plan_id=p1, ends_step=True)):
        assert apply(state, raw, RULES) is None


def test_a_multi_step_plan_is_judged_by_its_deciding_step() -> None:
    state, _ = run([diagnosis("i1", "recycle_pool", "enable_cache")])
    p1 = plan_id_for("i1", 1)
    done = m.StepEnding(step_id="compact", action="recycle_pool", ended="succeeded",
                        released=True)
    failed = m.StepEnding(step_id="defrag_m2", action="recycle_pool", ended="failed",
                          detail="HTTP 500", released=True)
    skipped = m.StepEnding(step_id="disarm", action="recycle_pool", ended="skipped",
                           rule="dependency", detail="dependency 'defrag_m2' did not succeed")
    step = apply(state, m.PlanEnded(incident_id="i1", plan_id=p1, outcome="failed",
                                    steps=[done, failed, skipped], deciding=failed), RULES)
    assert step is not None
    [req] = step.events
    assert isinstance(req, m.DiagnosisRequested)
    assert req.reason == "step defrag_m2 of 3: execution of recycle_pool failed: HTTP 500"
    # A blast-radius veto of a later step parks; it is not a failed fix.
    held = m.StepEnding(step_id="defrag_m1", action="recycle_pool", ended="vetoed",
                        rule="blast_radius", detail="blast radius: 1 disruptive step(s)")
    step = apply(state, m.PlanEnded(incident_id="i1", plan_id=p1, outcome="blocked",
                                    steps=[done, held], deciding=held), RULES)
    assert step is not None and step.state.parked == "limit" and step.state.attempt == 0


def test_a_decision_that_does_not_end_the_step_waits() -> None:
    _, out = run([
        diagnosis("i1", "recycle_pool", "restart_worker"),
        m.Decision(incident_id="i1", outcome="killed", reason="kill", plan_id=plan_id_for("i1", 1)),
        m.Decision(incident_id="i1", outcome="revoked", reason="by ana",
                   plan_id=plan_id_for("i1", 1)),
        m.Decision(incident_id="i1", outcome="awaiting_approval", reason="risk",
                   plan_id=plan_id_for("i1", 1)),
    ])
    assert kinds(out) == ["Plan"]


def test_unregistered_action_is_skipped() -> None:
    _, out = run([diagnosis("i1", "format_disk", "recycle_pool")])
    assert [p.steps[0].action for p in out] == ["recycle_pool"]


def test_max_attempts_then_escalation_then_only_resolution_or_a_human() -> None:
    rules = Rules(max_attempts=2, spec_for=RULES.spec_for)
    state, out = run([diagnosis("i1", "recycle_pool", "restart_worker", "enable_cache"),
                      verdict("i1", plan_id_for("i1", 1))], rules)
    state, more = run_from(state, [answer(out[-1], "restart_worker", "enable_cache"),
                                   verdict("i1", plan_id_for("i1", 2)),
                                   verdict("i1", plan_id_for("i1", 2))], rules)
    out += more
    assert kinds(out) == ["Plan", "DiagnosisRequested", "Plan", "IncidentEscalated"]
    esc = out[-1]
    assert esc.attempts == 2 and "2 attempt(s) failed" in esc.reason
    assert state is not None and state.closed == "escalated"
    # Escalated is not ended: a human's retry re-enters with a fresh budget and look.
    state, more = run_from(state, [m.RetryRequested(incident_id="i1", by="ana")], rules)
    [req] = more
    assert isinstance(req, m.DiagnosisRequested) and "ana asked for a retry" in req.reason
    assert [h.action for h in req.history] == ["recycle_pool", "restart_worker"]
    state, more = run_from(state, [answer(req, "enable_cache")], rules)
    assert kinds(more) == ["Plan"] and more[0].attempt == 3
    state, more = run_from(state, [verdict("i1", more[0].plan_id)], rules)
    assert kinds(more) == ["DiagnosisRequested"]  # the fresh budget is not spent yet


def test_an_escalated_incident_ends_only_when_resolved() -> None:
    state, out = run([diagnosis("i1", "recycle_pool"), verdict("i1", plan_id_for("i1", 1))])
    state, out = run_from(state, [answer(out[-1])])
    assert kinds(out) == ["IncidentEscalated"] and state is not None
    state, out = run_from(state, [verdict("i1", plan_id_for("i1", 1), passed=True)])
    assert state is not None and state.closed == "escalated"
    state, out = run_from(state, [m.IncidentResolved(incident_id="i1", subject="webshop",
                                                     invariant="latency_p99", reason="holds")])
    assert state is not None and state.closed == "resolved"
    assert state.reason.startswith("escalated, then resolved")
    _, out = run_from(state, [m.RetryRequested(incident_id="i1", by="ana")])
    assert out == []


def test_an_escalated_incident_re_enters_when_its_value_moves_by_the_factor() -> None:
    state, out = run([diagnosis("i1", escalate=True)])
    upd = [m.IncidentUpdated(incident_id="i1", subject="webshop", invariant="latency_p99",
                             value=v) for v in (900.0, 1200.0, 600.0, 1900.0)]
    state, out = run_from(state, upd[:3])
    assert out == [] and state is not None and state.escalated_value == 900.0
    state, out = run_from(state, upd[3:])
    assert kinds(out) == ["DiagnosisRequested"] and "moved from 900 to 1900" in out[0].reason


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


def test_an_unanswered_re_diagnosis_falls_back_to_the_untried_leftovers() -> None:
    state, _ = run([diagnosis("i1", "recycle_pool", "enable_cache"),
                      verdict("i1", plan_id_for("i1", 1))])
    assert state is not None
    step = diagnosis_overdue(state, m.Event(incident_id="i1"), RULES)
    assert step is not None and kinds(step.events) == ["Plan"]
    assert step.events[0].steps[0].action == "enable_cache"


def test_recurrence_is_escalated_once_per_window() -> None:
    index = SubjectIndex()
    got = [recurrence(index, "webshop", "error_rate", f"i{n}", 100.0 * n, 3, 600.0)
           for n in range(1, 6)]
    assert [g is not None for g in got] == [False, False, True, False, False]
    rec = got[2]
    assert rec is not None and rec.count == 3 and rec.incidents == ["i1", "i2", "i3"]
    # Quiet for a window, then it counts anew.
    later = [recurrence(index, "webshop", "error_rate", f"j{n}", 5000.0 + 10 * n, 3, 600.0)
             for n in range(3)]
    assert [g is not None for g in later] == [False, False, True]


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


async def next_request(col: Collector, incident: str, n: int = 1) -> m.DiagnosisRequested:
    found = await col.wait_for(lambda e: isinstance(e, m.DiagnosisRequested)
                               and e.incident_id == incident, count=n)
    req: m.DiagnosisRequested = found[n - 1]
    return req


@pytest.mark.e2e
async def test_failed_verdict_asks_for_a_fresh_diagnosis_and_plans_its_answer(
        bus: Bus) -> None:
    await start_planner(bus)
    async with bus.collect() as col:
        d = bus_diagnosis("recycle_pool", "failover_dependency", "restart_worker")
        await bus.publish("diagnoser", d)
        p1 = await next_plan(col, d.incident_id, 1)
        await bus.publish("verifier", verdict(d.incident_id, p1.plan_id))
        req = await next_request(col, d.incident_id)
        assert req.producer == "planner" and req.attempt == 2
        assert [(h.action, h.outcome) for h in req.history] == [("recycle_pool",
                                                                 "verdict_failed")]
        # A stale answer (another request) is ignored; the right one is planned.
        await bus.publish("diagnoser", answer(msgspec.structs.replace(req, id=m.new_id()),
                                              "failover_dependency"))
        await bus.publish("diagnoser", answer(req, "enable_cache"))
        p2 = await next_plan(col, d.incident_id, 2)
        await barrier(bus, col)
    assert p2.steps[0].action == "enable_cache" and p2.plan_id != p1.plan_id
    assert len(plans_of(col, d.incident_id)) == 2


@pytest.mark.e2e
async def test_a_rate_limit_veto_parks_and_retries(bus: Bus) -> None:
    bus.write_config("[planner]\npark_retry_s = 0.5\n")
    await start_planner(bus)
    async with bus.collect() as col:
        d = bus_diagnosis("scale_pool", "recycle_pool")
        d = msgspec.structs.replace(d, actions=[
            m.RecommendedAction(action="scale_pool", params={"size": 16}),
            m.RecommendedAction(action="recycle_pool")])
        await bus.publish("diagnoser", d)
        p1 = await next_plan(col, d.incident_id, 1)
        assert p1.steps[0].params == {"size": 16}
        await bus.publish("governor", governed(m.Decision(
            incident_id=d.incident_id, subject="webshop", outcome="vetoed",
            reason="rate limit: 6 executions on 'webshop' in the last minute (max 6)",
            plan_id=p1.plan_id, ends_step=True)))
        [parked] = await col.wait_for(lambda e: isinstance(e, m.IncidentParked)
                                      and e.incident_id == d.incident_id)
        found = await col.wait_for(lambda e: isinstance(e, m.Plan)
                                   and e.incident_id == d.incident_id, count=2)
    again = found[1]
    assert parked.obstacle == "limit" and parked.action == "scale_pool"
    assert again.attempt == 1 and again.steps[0].action == "scale_pool"
    assert again.plan_id != p1.plan_id and "retry after limit" in again.rationale


@pytest.mark.e2e
async def test_max_attempts_escalates_and_posts_the_webhook(bus: Bus) -> None:
    async with webhook_server() as hook:
        bus.write_config(f'[planner]\nmax_attempts = 2\nescalation_webhook = "{hook.url}"\n')
        await start_planner(bus)
        async with bus.collect() as col:
            d = bus_diagnosis("recycle_pool", "failover_dependency", "restart_worker")
            await bus.publish("diagnoser", d)
            p1 = await next_plan(col, d.incident_id, 1)
            await bus.publish("governor", governed(m.ExecutionResult(
                incident_id=d.incident_id, subject="webshop", execution_id=m.new_id(),
                plan_id=p1.plan_id, action="recycle_pool", status="failed",
                detail="HTTP 500")))
            req = await next_request(col, d.incident_id)
            await bus.publish("diagnoser", answer(req, "failover_dependency"))
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
async def test_an_escalated_incident_is_reminded_and_re_enters_on_a_retry(bus: Bus) -> None:
    async with webhook_server() as hook:
        bus.write_config(f'[planner]\nreminder_s = 0.5\nescalation_webhook = "{hook.url}"\n')
        await start_planner(bus)
        async with bus.collect() as col:
            d = bus_diagnosis(escalate=True)
            await bus.publish("diagnoser", d)
            await col.wait_for(lambda e: isinstance(e, m.IncidentEscalated)
                               and e.incident_id == d.incident_id)
            deadline = time.monotonic() + 20
            while len([b for _, b in hook.received if b["event"] == "incident.still_escalated"
                       ]) < 2:
                assert time.monotonic() < deadline, hook.received
                hook.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hook.arrived.wait(), 5)
            reminders = [b for _, b in hook.received if b["event"] == "incident.still_escalated"]
            assert [r["reminder"] for r in reminders[:2]] == [1, 2]
            await bus.publish("operator", m.RetryRequested(incident_id=d.incident_id,
                                                           subject="webshop", by="ana"))
            req = await next_request(col, d.incident_id)
            assert "ana asked for a retry" in req.reason
            await bus.publish("diagnoser", answer(req, "recycle_pool"))
            plan = await next_plan(col, d.incident_id, 1)
            assert plan.steps[0].action == "recycle_pool"
            # A retry for an incident the planner never saw is dead-lettered, not lost.
            await bus.publish("operator", m.RetryRequested(incident_id="nobody", by="ana",
                                                           subject="webshop"))
            [dl] = await col.wait_for(lambda e: isinstance(e, m.DeadLetter)
                                      and e.actor == "planner")
            assert "knows no incident" in dl.reason


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
        req = await next_request(col, d.incident_id)
        await bus.publish("diagnoser", answer(req, "failover_dependency"))
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



@pytest.mark.e2e
async def test_a_tick_committed_when_the_planner_dies_is_published_by_its_successor(
        bus: Bus) -> None:
    bus.write_config("[planner]\npark_retry_s = 0.5\n")
    first = spawn_stopping(bus, "planner", "tick_committed")
    await bus.wait_heartbeat("planner")
    async with bus.collect() as col:
        d = bus_diagnosis("recycle_pool")
        await bus.publish("diagnoser", d)
        p1 = await next_plan(col, d.incident_id, 1)
        await bus.publish("governor", governed(m.Decision(
            incident_id=d.incident_id, subject="webshop", outcome="vetoed",
            reason="rate limit: 6 executions on 'webshop' in the last minute (max 6)",
            plan_id=p1.plan_id, ends_step=True)))
        await col.wait_for(lambda e: isinstance(e, m.IncidentParked)
                           and e.incident_id == d.incident_id)
        # Its next tick retries the parked incident: committed, then the process stops
        # before publishing; it dies there.
        await wait_stopped(first)
        assert len(plans_of(col, d.incident_id)) == 1
        first.kill()
        await start_planner(bus)
        found = await col.wait_for(lambda e: isinstance(e, m.Plan)
                                   and e.incident_id == d.incident_id, count=2)
    again = found[1]
    assert again.plan_id != p1.plan_id and again.steps[0].action == "recycle_pool"
    assert len({p.id for p in plans_of(col, d.incident_id)}) == 2


@pytest.mark.e2e
async def test_an_escalated_incident_re_enters_when_its_evidence_changes_materially(
        bus: Bus) -> None:
    await start_planner(bus)
    async with bus.collect() as col:
        d = bus_diagnosis(escalate=True)
        await bus.publish("diagnoser", d)
        await col.wait_for(lambda e: isinstance(e, m.IncidentEscalated)
                           and e.incident_id == d.incident_id)

        def updated(value: float) -> m.IncidentUpdated:
            return m.IncidentUpdated(incident_id=d.incident_id, subject="webshop",
                                     invariant="latency_p99", value=value)

        await bus.publish("detector", updated(900.0))
        await bus.publish("detector", updated(1200.0))  # x1.33: not material (factor 2)
        await barrier(bus, col)
        assert not [e for e in col.events(m.DiagnosisRequested)
                    if e.incident_id == d.incident_id]
        await bus.publish("detector", updated(2000.0))  # x2.2 since the escalation
        req = await next_request(col, d.incident_id)
    assert "the evidence changed: latency_p99 moved from 900 to 2000" in req.reason


def test_a_multi_step_remedy_becomes_one_plan_keeping_its_steps() -> None:
    rec = m.RecommendedAction(action="drain_and_recycle", max_parallel=1, steps=[
        m.RecommendedStep(id="cache", action="enable_cache"),
        m.RecommendedStep(id="recycle", action="recycle_pool", depends_on=["cache"],
                          mode="async")])
    d = msgspec.structs.replace(diagnosis("i1"), actions=[rec])
    _, [plan] = run([d])
    assert plan.max_parallel == 1 and plan.attempt == 1
    assert [(s.step_id, s.action, s.depends_on, s.mode) for s in plan.steps] == [
        ("cache", "enable_cache", [], "sync"), ("recycle", "recycle_pool", ["cache"], "async")]
    # One unregistered step makes the whole remedy unusable.
    broken = msgspec.structs.replace(rec, steps=[*rec.steps, m.RecommendedStep(
        id="x", action="format_disk")])
    _, out = run([msgspec.structs.replace(diagnosis("i1"), actions=[broken])])
    assert kinds(out) == ["IncidentEscalated"] and "format_disk: not registered" in out[0].reason
