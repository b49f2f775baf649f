"""The planner actor: a plan per diagnosis, the next alternative on failure, then a human.

Attempt 1 is the diagnosis's top-ranked action as a one-step plan; the other
ranked actions are kept as alternatives. A failed verdict, a failed (or
timed out, unknown, cancelled, skipped) execution, or a veto or denial of the
current plan moves to the next alternative as attempt n+1. After
`planner.max_attempts` plans, or with no alternative left, the incident is
escalated (an IncidentEscalated event plus the webhook). A diagnosis that
asks for a human is escalated at once. A passed verdict or a resolved
incident closes the incident for the planner.

State: one JSON record per incident in the KV bucket `menders_planner`
(key: the incident id), written with compare-and-swap before the outputs
are published. Each record keeps the ids of the inputs already applied and
the outputs of the last one, so a redelivered input republishes exactly the
same events (same ids: the stream drops the copies) instead of planning
again, and a restarted planner carries on at the attempt it had reached.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

import subjects
from actors.escalation import EscalationWebhook
from actors.runtime import Actor, Delivery, Reject, derive_id
from bus_schemas import catalog
from bus_schemas.messages import (
    Decision,
    Diagnosis,
    Event,
    ExecutionResult,
    IncidentEscalated,
    IncidentResolved,
    Plan,
    PlanStep,
    RecommendedAction,
    Verdict,
)
from subjects.base import ActionError, ActionSpec, SubjectDefinition

log = logging.getLogger("menders.planner")

FAILED_STATUSES = frozenset({"failed", "timed_out", "unknown", "cancelled", "skipped"})
# awaiting_approval waits; revoked and killed executions end in an ExecutionResult.
REFUSALS = frozenset({"vetoed", "denied"})
SEEN_LIMIT = 64  # input ids remembered per incident: far more than one incident's events
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

Output = Plan | IncidentEscalated


class IncidentState(msgspec.Struct, frozen=True, kw_only=True):
    incident_id: str
    subject: str = ""
    invariant: str = ""
    hypothesis: str = ""
    attempt: int = 0  # plans made so far
    plan_id: str = ""  # the current plan
    action: str = ""  # the current plan's action
    alternatives: list[RecommendedAction] = []  # not tried yet, best first
    closed: str = ""  # "" while open; resolved | verified | escalated
    reason: str = ""  # why it closed
    seen: list[str] = []  # ids of the inputs already applied
    last_input: str = ""
    outbox: list[Output] = []  # what the last input produced, replayed on its redelivery
    updated_at: float = 0.0


@dataclass(frozen=True)
class Rules:
    max_attempts: int
    spec_for: Callable[[str, str], ActionSpec | None]  # (managed subject, action)


@dataclass(frozen=True)
class Step:
    state: IncidentState
    events: list[Output] = field(default_factory=list)
    escalation: str = ""  # the bounded reason category, for metrics


def state_key(incident_id: str) -> str:
    """The KV key of an incident: the id itself when it is a safe key token."""
    return incident_id if _PLAIN_KEY.match(incident_id) else derive_id("incident", incident_id)


def plan_id_for(incident_id: str, attempt: int) -> str:
    # One id per (incident, attempt), whatever input led to it: no duplicate plans.
    return derive_id("plan", incident_id, attempt)


# --- the pure state machine ---------------------------------------------------------


def apply(state: IncidentState | None, event: Event, rules: Rules) -> Step | None:
    """The planner's reaction to one input, or None when it changes nothing."""
    if state is not None and state.closed:
        return None
    if isinstance(event, Diagnosis):
        return _on_diagnosis(state, event, rules)
    if isinstance(event, IncidentResolved):
        return _close(state or _fresh(event), "resolved", event.reason)
    if state is None or not state.plan_id:
        return None  # nothing of ours to judge yet
    if isinstance(event, Verdict):
        if event.passed:
            return _close(state, "verified", event.reason)
        if event.plan_id == state.plan_id:
            return _next(state, event, f"verdict failed: {event.reason}", rules)
    elif isinstance(event, ExecutionResult):
        if event.plan_id == state.plan_id and event.status in FAILED_STATUSES:
            why = f"execution of {event.action} {event.status}"
            return _next(state, event, f"{why}: {event.detail}" if event.detail else why, rules)
    elif isinstance(event, Decision):
        if event.plan_id == state.plan_id and event.outcome in REFUSALS:
            return _next(state, event, f"governor {event.outcome}: {event.reason}", rules)
    return None


def _fresh(event: Event) -> IncidentState:
    return IncidentState(incident_id=event.incident_id, subject=event.subject,
                         invariant=getattr(event, "invariant", ""))


def _close(state: IncidentState, how: str, reason: str) -> Step:
    return Step(msgspec.structs.replace(state, closed=how, reason=reason))


def _on_diagnosis(state: IncidentState | None, d: Diagnosis, rules: Rules) -> Step | None:
    if state is not None and state.attempt > 0:
        return None  # planned already: a later diagnosis does not restart the count
    state = msgspec.structs.replace(state or _fresh(d), subject=d.subject,
                                    invariant=d.invariant, hypothesis=d.hypothesis,
                                    alternatives=list(d.actions))
    if d.escalate:
        return _escalate(state, d, "diagnosis", f"the diagnosis asks for a human: {d.hypothesis}")
    return _next(state, d, "", rules)


def _next(state: IncidentState, cause: Event, why: str, rules: Rules) -> Step:
    """The next viable alternative as attempt n+1, or the escalation."""
    alternatives = list(state.alternatives)
    unusable: list[str] = []
    while True:
        if state.attempt >= rules.max_attempts:
            return _escalate(state, cause, "max_attempts",
                             f"{state.attempt} attempt(s) failed, the last: {why}")
        if not alternatives:
            if state.attempt == 0:
                detail = f" ({'; '.join(unusable)})" if unusable else ""
                return _escalate(state, cause, "no_actions",
                                 f"the diagnosis recommends no usable action{detail}")
            return _escalate(state, cause, "no_alternatives",
                             f"no alternative left after {state.attempt} attempt(s), "
                             f"the last: {why}")
        rec = alternatives.pop(0)
        spec = rules.spec_for(state.subject, rec.action)
        if spec is None:
            unusable.append(f"{rec.action}: not registered")
            continue
        try:
            spec.validate(rec.params)  # the diagnoser checked too; an LLM one may not have
        except ActionError as exc:
            unusable.append(str(exc))
            continue
        return _plan(state, cause, rec, spec, alternatives, why)


def _plan(state: IncidentState, cause: Event, rec: RecommendedAction, spec: ActionSpec,
          rest: list[RecommendedAction], why: str) -> Step:
    attempt = state.attempt + 1
    plan_id = plan_id_for(state.incident_id, attempt)
    step = PlanStep(step_id=derive_id(plan_id, "step", 1), action=rec.action,
                    params=rec.params, risk=spec.risk, idempotent=spec.idempotent,
                    timeout_s=spec.timeout_s)
    rationale = rec.rationale or state.hypothesis
    if why:
        rationale = f"after {why}; {rationale}"
    plan = Plan(id=plan_id, incident_id=state.incident_id, causation_id=cause.id,
                subject=state.subject, plan_id=plan_id, invariant=state.invariant,
                attempt=attempt, steps=[step], rationale=rationale)
    new = msgspec.structs.replace(state, attempt=attempt, plan_id=plan_id, action=rec.action,
                                  alternatives=rest)
    return Step(new, [plan])


def _escalate(state: IncidentState, cause: Event, category: str, reason: str) -> Step:
    esc = IncidentEscalated(id=derive_id("escalated", state.incident_id),
                            incident_id=state.incident_id, causation_id=cause.id,
                            subject=state.subject, invariant=state.invariant,
                            reason=reason, attempts=state.attempt)
    new = msgspec.structs.replace(state, closed="escalated", reason=reason)
    return Step(new, [esc], escalation=category)


# --- the actor ------------------------------------------------------------------------


_state_decoder = msgspec.json.Decoder(IncidentState)


class Planner(Actor):
    name = "planner"

    async def setup(self) -> None:
        assert self.rt.js is not None
        self.kv: KeyValue = await self.rt.js.key_value(catalog.PLANNER_BUCKET)
        self._definitions: dict[str, SubjectDefinition | None] = {}
        self.rules = Rules(self.config.planner.max_attempts, self._spec)
        metrics = self.rt.metrics
        self.plans = metrics.counter("menders_plans", "Plans made, by attempt", ["attempt"])
        self.escalations = metrics.counter(
            "menders_escalations", "Incidents escalated to a human, by reason "
            "(diagnosis, max_attempts, no_alternatives, no_actions)", ["reason"])
        self.webhook = EscalationWebhook(
            self.config.planner.escalation_webhook,
            metrics.counter("menders_escalation_webhook", "Escalation webhook POSTs, by "
                            "outcome (sent, failed)", ["outcome"]))

    async def teardown(self) -> None:
        await self.webhook.close()

    def _spec(self, subject: str, action: str) -> ActionSpec | None:
        cfg = self.config.subjects.get(subject)
        kind = cfg.kind if cfg is not None else subject
        if kind not in self._definitions:
            try:
                self._definitions[kind] = subjects.load(kind)
            except KeyError:
                self._definitions[kind] = None
        definition = self._definitions[kind]
        return definition.actions.get(action) if definition is not None else None

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        if not event.incident_id:
            if isinstance(event, Diagnosis):
                raise Reject("a diagnosis without an incident id cannot be planned")
            return ()  # e.g. a kill decision that names no incident: not ours
        key = state_key(event.incident_id)
        state, revision = await self._load(key)
        if state is not None and event.id in state.seen:
            if event.id != state.last_input:
                return ()
            log.info("replaying the outputs of a redelivered input")
            self._notify(state.outbox)
            return state.outbox
        step = apply(state, event, self.rules)
        if step is None:
            return ()
        seen = [*(state.seen if state else []), event.id][-SEEN_LIMIT:]
        new = msgspec.structs.replace(step.state, seen=seen, last_input=event.id,
                                      outbox=step.events, updated_at=time.time())
        await self._save(key, new, revision)  # before publishing: see the module doc
        self._count(step)
        self._notify(step.events)
        return step.events

    async def _load(self, key: str) -> tuple[IncidentState | None, int | None]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, None
        if entry.value is None:
            return None, entry.revision
        return _state_decoder.decode(entry.value), entry.revision

    async def _save(self, key: str, state: IncidentState, revision: int | None) -> None:
        # Compare-and-swap: a concurrent writer makes this raise, the input is
        # nak'ed and re-applied to the fresher state.
        data = msgspec.json.encode(state)
        if revision is None:
            await self.kv.create(key, data)
        else:
            await self.kv.update(key, data, last=revision)

    def _count(self, step: Step) -> None:
        for e in step.events:
            if isinstance(e, Plan):
                self.plans.labels(attempt=str(e.attempt)).inc()
                log.info("planned", extra={"attempt": e.attempt, "plan_id": e.plan_id,
                                           "action": e.steps[0].action})
            else:
                self.escalations.labels(reason=step.escalation).inc()
                log.warning("escalated", extra={"reason": e.reason, "attempts": e.attempts})

    def _notify(self, events: Sequence[Output]) -> None:
        for e in events:
            if isinstance(e, IncidentEscalated):
                self.webhook.notify(e)


ACTOR = Planner
