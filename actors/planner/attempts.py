"""The planner's rules, pure: one incident's plan attempts as a state machine.

`apply(state, event, rules)` takes the incident's record (None for a new one)
and one input (a diagnosis, a decision, a result, a verdict, a resolution) and
returns the next record and the events to publish, or None when the input
changes nothing. No I/O and no clock: actor.py loads and saves the record with
a compare-and-swap and publishes the outputs, so a redelivered input replays
the same outputs instead of planning again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from actors.runtime import derive_id
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
from subjects.base import ActionError, ActionSpec

FAILED_STATUSES = frozenset({"failed", "timed_out", "unknown", "cancelled", "skipped"})
# A Decision that ends the current plan's step: a refusal, or any Decision the governor
# marks `ends_step` (revoked before release, expired unreported). awaiting_approval
# waits; a `killed` or `revoked` released step ends in its executor's ExecutionResult.
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
    follows: str = ""  # the leader incident whose remediation this one waits on
    wants_human: str = ""  # the diagnosis asked for a human: the escalation reason, kept
    reason: str = ""  # why it closed
    seen: list[str] = []  # ids of the inputs already applied
    last_input: str = ""
    outbox: list[Output] = []  # what the last input produced, replayed on its redelivery
    updated_at: float = 0.0


class SubjectIndex(msgspec.Struct, kw_only=True):
    """Which incidents of one subject lead a remediation, and who follows whom."""

    leaders: dict[str, str] = {}  # incident id -> the action of its current plan
    followers: dict[str, str] = {}  # follower incident id -> leader incident id
    waiting: dict[str, float] = {}  # follower whose leader verified -> plan it after this
    done_action: dict[str, str] = {}  # waiting follower -> the action that already ran
    # Followers that wait for a *different* remediation to settle (their own diagnosis
    # named another fix, or none): they do not escalate with the leader.
    settling: list[str] = []


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


def index_key(subject: str) -> str:
    return f"subject.{subject}"


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
        if event.plan_id == state.plan_id and (event.outcome in REFUSALS or event.ends_step):
            return _next(state, event, f"governor {event.outcome}: {event.reason}", rules)
    return None


def _fresh(event: Event) -> IncidentState:
    return IncidentState(incident_id=event.incident_id, subject=event.subject,
                         invariant=getattr(event, "invariant", ""))


def _close(state: IncidentState, how: str, reason: str) -> Step:
    return Step(msgspec.structs.replace(state, closed=how, reason=reason))


def _on_diagnosis(state: IncidentState | None, d: Diagnosis, rules: Rules) -> Step | None:
    if state is not None and (state.attempt > 0 or state.follows):
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


def follow(state: IncidentState, diagnosis: Diagnosis, leader: str, why: str) -> Step:
    """Instead of planning now, wait on `leader`'s remediation of the same subject."""
    plan_id = derive_id("follows", state.incident_id, leader)
    plan = Plan(id=plan_id, incident_id=state.incident_id, causation_id=diagnosis.id,
                subject=state.subject, plan_id=plan_id, invariant=state.invariant, attempt=0,
                steps=[], follows=leader, rationale=why)
    wants_human = (f"the diagnosis asks for a human: {diagnosis.hypothesis}"
                   if diagnosis.escalate else "")
    new = msgspec.structs.replace(state, follows=leader, attempt=0, plan_id="", action="",
                                  alternatives=list(diagnosis.actions), closed="", reason="",
                                  wants_human=wants_human)
    return Step(new, [plan])


def escalate_with(state: IncidentState, leader: IncidentEscalated) -> Step:
    return _escalate(state, leader, "with_leader",
                     f"escalated with incident {leader.incident_id}: {leader.reason}")


def plan_on_own(state: IncidentState, done_action: str, cause: Event, rules: Rules) -> Step:
    """A follower whose leader's fix verified but which did not resolve: its own plan."""
    rest = [a for a in state.alternatives if a.action != done_action]
    state = msgspec.structs.replace(state, follows="", alternatives=rest)
    if state.wants_human:
        return _escalate(state, cause, "diagnosis", state.wants_human)
    why = (f"{done_action} settled on incident {cause.incident_id} but this one stayed broken"
           if done_action else f"incident {cause.incident_id}'s remediation did not settle")
    return _next(state, cause, why, rules)


def _escalate(state: IncidentState, cause: Event, category: str, reason: str) -> Step:
    esc = IncidentEscalated(id=derive_id("escalated", state.incident_id),
                            incident_id=state.incident_id, causation_id=cause.id,
                            subject=state.subject, invariant=state.invariant,
                            reason=reason, attempts=state.attempt)
    new = msgspec.structs.replace(state, closed="escalated", reason=reason)
    return Step(new, [esc], escalation=category)


# --- the actor ------------------------------------------------------------------------
