"""The planner's rules, pure: one incident's plan attempts as a state machine.

`apply(state, event, rules, now)` takes the incident's record (None for a new
one), one input (a diagnosis, a decision, a result, a verdict, an update, a
resolution, a human's retry) and the time, and returns the next record and the
events to publish, or None when the input changes nothing. No I/O and no
clock of its own: actor.py loads and saves the record with a compare-and-swap
and publishes the outputs, so a redelivered input replays the same outputs
instead of planning again.

An *attempt* is an action that ran. How a step ends decides what follows
(`ending_of`):

- it ran and did not fix it (a failed verdict; a failed, timed-out or unknown
  step): the attempt is used and recorded, and the next plan comes from a
  *fresh diagnosis* (DiagnosisRequested, carrying the attempt history), not
  from the first diagnosis's leftovers; after `max_attempts` it escalates;
- it was held back by something that is not the fix's fault (kill switch,
  observe mode, a rate/cooldown/concurrency window, an approval nobody gave in
  time, an expiry, a skip or cancellation for one of those): the incident is
  *parked* (IncidentParked), no attempt is used, and the same action is planned
  again when the obstacle lifts (`unpark`) or, at the latest, after a bounded,
  doubling backoff;
- it was refused for this action (a human's denial, an operator's revocation,
  an allow-list or registry veto): the action is excluded for this incident
  and the next alternative is planned at once, without using an attempt.

Escalated is not ended: an escalated incident still closes on its resolution
("escalated, then resolved"), and re-enters the loop, with a fresh attempt
budget and a fresh diagnosis, on a human's retry or on an update whose value
moved by `reentry_factor` since it escalated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from actors.runtime import derive_id
from bus_schemas.messages import (
    AttemptRecord,
    Decision,
    Diagnosis,
    DiagnosisRequested,
    Event,
    ExecutionResult,
    IncidentEscalated,
    IncidentParked,
    IncidentRecurring,
    IncidentResolved,
    IncidentUpdated,
    ObstacleKind,
    Plan,
    PlanEnded,
    PlanStep,
    RecommendedAction,
    RecommendedStep,
    RetryRequested,
    StepEnding,
    Verdict,
)
from subjects.base import ActionError, ActionSpec

# Ran, and did not fix it: an attempt used, a fresh diagnosis next.
FAILED_STATUSES = frozenset({"failed", "timed_out", "unknown"})
FINAL = frozenset({"resolved", "verified"})  # closed for good; "escalated" is not final
SEEN_LIMIT = 64  # input ids remembered per incident: far more than one incident's events
HISTORY_LIMIT = 20  # attempt records kept per incident (and sent with each request)
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

Output = Plan | IncidentEscalated | DiagnosisRequested | IncidentParked | IncidentRecurring
Ending = Literal["failed", "park", "refused"]


class IncidentState(msgspec.Struct, frozen=True, kw_only=True):
    incident_id: str
    subject: str = ""
    invariant: str = ""
    hypothesis: str = ""
    attempt: int = 0  # attempts used: plans whose action ran (or runs now)
    plans: int = 0  # plans made, parked and refused ones included (the plan ids)
    attempt_base: int = 0  # `attempt` when a human's retry (or new evidence) restarted the budget
    plan_id: str = ""  # the current plan ("" while parked or waiting for a diagnosis)
    action: str = ""  # the current plan's action
    current: RecommendedAction | None = None  # the current plan's action and params
    alternatives: list[RecommendedAction] = []  # not tried yet, best first
    symptoms: dict[str, float] = {}  # what the current diagnosis was made on
    history: list[AttemptRecord] = []  # the attempts that ran, oldest first
    excluded: list[str] = []  # actions refused for this incident (denied, revoked, vetoed)
    request_id: str = ""  # the DiagnosisRequested whose answer is awaited
    requests: int = 0  # requests made (their ids)
    requested_at: float = 0.0
    parked: str = ""  # the obstacle kind while parked
    park_reason: str = ""
    parks: int = 0  # parks in a row, for the backoff
    retry_at: float = 0.0  # when a parked incident is tried again at the latest
    closed: str = ""  # "" while open; resolved | verified (final) | escalated (not final)
    escalated_value: float = 0.0  # the incident's value when it escalated (0: unknown yet)
    reentries: int = 0  # times an escalated incident re-entered the loop
    follows: str = ""  # the leader incident whose remediation this one waits on
    wants_human: str = ""  # the diagnosis asked for a human: the escalation reason, kept
    reason: str = ""  # why it closed
    seen: list[str] = []  # ids of the inputs already applied
    last_input: str = ""
    outbox: list[Output] = []  # what the last input produced, replayed on its redelivery
    updated_at: float = 0.0


class SubjectIndex(msgspec.Struct, kw_only=True):
    """Which incidents of one subject lead a remediation, and who follows whom; which
    are parked, waiting for a diagnosis, escalated; which invariants keep breaking."""

    leaders: dict[str, str] = {}  # incident id -> the action of its current plan
    followers: dict[str, str] = {}  # follower incident id -> leader incident id
    waiting: dict[str, float] = {}  # follower whose leader verified -> plan it after this
    done_action: dict[str, str] = {}  # waiting follower -> the action that already ran
    # Followers that wait for a *different* remediation to settle (their own diagnosis
    # named another fix, or none): they do not escalate with the leader.
    settling: list[str] = []
    parked: dict[str, float] = {}  # parked incident -> when to try it again
    parked_kind: dict[str, str] = {}  # parked incident -> its obstacle kind
    diagnosing: dict[str, float] = {}  # incident waiting for a fresh diagnosis -> give up at
    escalated: dict[str, float] = {}  # escalated, still broken -> next webhook reminder at
    reminders: dict[str, int] = {}  # reminders sent per escalated incident (the backoff)
    recent: list[tuple[str, str, float]] = []  # (invariant, incident, first seen), in window
    recurring: dict[str, float] = {}  # invariant -> when its recurrence was escalated
    # What the background tick decided but may not have published yet: saved before
    # publishing, cleared after, re-published by the next tick (same ids: dedup).
    outbox: list[Output] = []


@dataclass(frozen=True)
class Rules:
    max_attempts: int
    spec_for: Callable[[str, str], ActionSpec | None]  # (managed subject, action)
    park_retry_s: float = 5.0
    park_retry_max_s: float = 300.0
    reentry_factor: float = 2.0


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


def plan_id_for(incident_id: str, n: int) -> str:
    # One id per (incident, n-th plan), whatever input led to it: no duplicate plans.
    # Without parks or refusals the n-th plan is attempt n.
    return derive_id("plan", incident_id, n)


# --- how a step ended -------------------------------------------------------------------


# The rule that decided (Decision.rule, ExecutionResult.rule) -> how the planner takes it.
RULE_ENDINGS: dict[str, tuple[Ending, ObstacleKind]] = {
    "kill": ("park", "kill"), "mode": ("park", "mode"),
    "concurrency": ("park", "limit"), "rate": ("park", "limit"),
    "cooldown": ("park", "limit"), "blast_radius": ("park", "limit"),
    "approval_timeout": ("park", "approval"), "expired": ("park", "expired"),
    "approval_expired": ("park", "expired"), "precondition": ("park", "other"),
    "registry": ("refused", "other"), "params": ("refused", "other"),
    "allow_list": ("refused", "other"), "dag": ("refused", "other"),
    "dependency": ("refused", "other"), "fire_and_forget": ("refused", "other"),
    "plan": ("refused", "other"),
    # The executor's: the incident healed first, another executor owns it, or this one
    # cannot run the subject; none is a "no" to the action, so it is tried again.
    "resolved": ("park", "other"), "lost_lease": ("park", "other"),
    "not_configured": ("park", "other"),
    "denied": ("refused", "other"), "revoked": ("refused", "other"),
}


def ending_of(event: Decision | ExecutionResult) -> tuple[Ending, ObstacleKind]:
    """Whether a step's end is a failed fix, an obstacle to wait out, or a "no" to the
    action. The rule named by the governor or the executor decides; events from before
    rules were named are read by their words."""
    if isinstance(event, ExecutionResult):
        return _ending(True, event.status, event.rule, event.detail)
    return _ending(False, event.outcome, event.rule, event.reason)


def ending_of_step(step: StepEnding) -> tuple[Ending, ObstacleKind]:
    """The same, for the step that decided a plan's end (PlanEnded.deciding)."""
    return _ending(step.released, step.ended, step.rule, step.detail)


def _ending(released: bool, ended: str, rule: str, why: str) -> tuple[Ending, ObstacleKind]:
    """`released`: an executor got the step, and `ended` is its ExecutionStatus (or the
    governor's `expired`/`revoked` for a step no executor reported); else `ended` is the
    governor's Decision outcome."""
    if released and ended in FAILED_STATUSES:
        return "failed", "other"
    if rule in RULE_ENDINGS and ended != "awaiting_approval":
        return RULE_ENDINGS[rule]
    if released and ended not in ("expired", "revoked"):
        if why.startswith("kill switch"):
            return "park", "kill"
        if why.startswith("revoked"):
            return "refused", "other"
        if why.startswith("mode is") or "mode is now approve" in why:
            return "park", "mode"
        if why.startswith(("approval expired", "approval valid for")):
            return "park", "expired"
        return "park", "other"
    if ended == "vetoed":
        if why.startswith("kill switch"):
            return "park", "kill"
        if why.startswith("observe mode"):
            return "park", "mode"
        if why.startswith(("concurrency limit", "rate limit", "cooldown")):
            return "park", "limit"
        return "refused", "other"  # registry, parameters, allow-list, dependencies
    if ended == "denied":
        if "no human decision within" in why:
            return "park", "approval"  # nobody looked: not a "no"
        return "refused", "other"
    if ended == "revoked":
        return "refused", "other"
    if ended == "expired":
        return "park", "expired"
    return "park", "other"


# --- the pure state machine ---------------------------------------------------------


def apply(state: IncidentState | None, event: Event, rules: Rules,
          now: float = 0.0) -> Step | None:
    """The planner's reaction to one input, or None when it changes nothing."""
    if state is not None and state.closed in FINAL:
        return None
    if isinstance(event, IncidentResolved):
        if state is not None and state.closed == "escalated":
            return _close(state, "resolved", f"escalated, then resolved: {event.reason}")
        return _close(state or _fresh(event), "resolved", event.reason)
    if state is not None and state.closed == "escalated":
        return _on_escalated(state, event, rules, now)
    if isinstance(event, Diagnosis):
        return _on_diagnosis(state, event, rules, now)
    if isinstance(event, RetryRequested):
        if state is None or not state.parked:
            return None  # unknown, or being worked already
        return unpark(state, event, rules, now)
    if state is None or not state.plan_id:
        return None  # nothing of ours to judge yet
    if isinstance(event, Verdict):
        if event.passed:
            return _close(state, "verified", event.reason)
        if event.plan_id == state.plan_id:
            # Inconclusive (no observations to judge on): the action ran, so the attempt
            # is used, and the fresh diagnosis looks again once there is evidence.
            outcome = "inconclusive" if event.inconclusive else "verdict_failed"
            word = "inconclusive" if event.inconclusive else "failed"
            return _failed(state, event, outcome, f"verdict {word}: {event.reason}",
                           rules, now)
    elif isinstance(event, PlanEnded):
        # The governor's word that every step of the plan ended; its deciding step says
        # how the attempt went. A success waits for the verifier's verdict.
        d = event.deciding
        if event.plan_id != state.plan_id or event.outcome == "succeeded" or d is None:
            return None
        where = f"step {d.step_id} of {len(event.steps)}: " if len(event.steps) > 1 else ""
        if d.released:
            why = f"{where}execution of {d.action} {d.ended}"
            why = f"{why}: {d.detail}" if d.detail else why
        else:
            why = f"{where}governor {d.ended}: {d.detail}"
        ending, kind = ending_of_step(d)
        if ending == "failed":
            return _failed(state, event, d.ended, why, rules, now)
        return _blocked(state, event, ending, kind, why, rules, now)
    return None


def _fresh(event: Event) -> IncidentState:
    return IncidentState(incident_id=event.incident_id, subject=event.subject,
                         invariant=getattr(event, "invariant", ""))


def _close(state: IncidentState, how: str, reason: str) -> Step:
    return Step(msgspec.structs.replace(state, closed=how, reason=reason, plan_id="",
                                        parked="", request_id=""))


def _on_diagnosis(state: IncidentState | None, d: Diagnosis, rules: Rules,
                  now: float) -> Step | None:
    if state is not None and state.request_id:
        if d.request_id != state.request_id:
            return None  # the first diagnosis again, or a late answer to an older request
        return _on_answer(state, d, rules)
    if d.request_id:
        return None  # an answer nobody waits for (any more)
    if state is not None and (state.plans > 0 or state.attempt > 0 or state.follows
                              or state.requests > 0):
        return None  # planned already: a later diagnosis does not restart the count
    state = msgspec.structs.replace(state or _fresh(d), subject=d.subject,
                                    invariant=d.invariant, hypothesis=d.hypothesis,
                                    alternatives=list(d.actions), symptoms=dict(d.symptoms))
    if d.escalate:
        return _escalate(state, d, "diagnosis", f"the diagnosis asks for a human: {d.hypothesis}")
    return _next(state, d, "", rules)


def _on_answer(state: IncidentState, d: Diagnosis, rules: Rules) -> Step:
    """The fresh diagnosis a request asked for: plan attempt n+1 from it."""
    history = list(state.history)
    if history and not history[-1].symptoms_after and d.symptoms:
        history[-1] = msgspec.structs.replace(history[-1], symptoms_after=dict(d.symptoms))
    usable = [a for a in d.actions if a.action not in state.excluded]
    state = msgspec.structs.replace(state, request_id="", hypothesis=d.hypothesis,
                                    symptoms=dict(d.symptoms) or state.symptoms,
                                    history=history, alternatives=usable)
    if d.escalate:
        return _escalate(state, d, "diagnosis",
                         f"the fresh diagnosis asks for a human: {d.hypothesis}")
    if not usable:
        return _escalate(state, d, "nothing_new",
                         f"the fresh diagnosis recommends nothing not tried or refused yet "
                         f"after {_used(state)} attempt(s) ({_tried(state)}): {d.hypothesis}")
    last = history[-1] if history else None
    why = f"a fresh diagnosis after {last.action} {last.outcome}" if last else "a fresh diagnosis"
    return _next(state, d, why, rules)


def _used(state: IncidentState) -> int:
    return state.attempt - state.attempt_base


def _tried(state: IncidentState) -> str:
    return ", ".join(f"{h.action}: {h.outcome}" for h in state.history[-5:]) or "nothing ran"


def _next(state: IncidentState, cause: Event, why: str, rules: Rules) -> Step:
    """The next viable alternative as the next plan, or the escalation."""
    alternatives = [a for a in state.alternatives if a.action not in state.excluded]
    unusable: list[str] = []
    while True:
        if _used(state) >= rules.max_attempts:
            return _escalate(state, cause, "max_attempts",
                             f"{_used(state)} attempt(s) failed ({_tried(state)}), the last: "
                             f"{why}")
        if not alternatives:
            if state.attempt == 0 and not state.history:
                detail = "; ".join(unusable + [f"{a}: refused" for a in state.excluded])
                detail = f" ({detail})" if detail else ""
                return _escalate(state, cause, "no_actions",
                                 f"the diagnosis recommends no usable action{detail}")
            return _escalate(state, cause, "no_alternatives",
                             f"no alternative left after {_used(state)} attempt(s) "
                             f"({_tried(state)}), the last: {why}")
        rec = alternatives.pop(0)
        steps = plan_steps(rec, state.subject, rules)
        if isinstance(steps, str):
            unusable.append(steps)
            continue
        return _plan(state, cause, rec, steps, alternatives, why)


def plan_steps(rec: RecommendedAction, subject: str, rules: Rules) -> list[PlanStep] | str:
    """The plan steps of one remedy, or why it cannot be planned. A single action is one
    step; a multi-step remedy keeps its steps' ids, dependencies and modes (the
    governor judges its waves). Every action must be registered with valid parameters:
    the diagnoser checked too, an LLM one may not have."""
    wanted = rec.steps or [RecommendedStep(id="", action=rec.action, params=rec.params)]
    out: list[PlanStep] = []
    for n, want in enumerate(wanted, 1):
        spec = rules.spec_for(subject, want.action)
        if spec is None:
            return f"{want.action}: not registered"
        try:
            spec.validate(want.params)
        except ActionError as exc:
            return str(exc)
        out.append(PlanStep(step_id=want.id or f"s{n}", action=want.action,
                            params=want.params, depends_on=list(want.depends_on),
                            mode=want.mode, risk=spec.risk, idempotent=spec.idempotent,
                            timeout_s=spec.timeout_s, disruptive=spec.disruptive))
    return out


def _plan(state: IncidentState, cause: Event, rec: RecommendedAction, steps: list[PlanStep],
          rest: list[RecommendedAction], why: str) -> Step:
    attempt = state.attempt + 1
    plans = state.plans + 1
    plan_id = plan_id_for(state.incident_id, plans)
    if not rec.steps:  # one action: its step id is derived, as it always was
        steps = [msgspec.structs.replace(steps[0], step_id=derive_id(plan_id, "step", 1))]
    rationale = rec.rationale or state.hypothesis
    if why:
        rationale = f"after {why}; {rationale}"
    plan = Plan(id=plan_id, incident_id=state.incident_id, causation_id=cause.id,
                subject=state.subject, plan_id=plan_id, invariant=state.invariant,
                attempt=attempt, steps=steps, rationale=rationale,
                max_parallel=rec.max_parallel)
    new = msgspec.structs.replace(state, attempt=attempt, plans=plans, plan_id=plan_id,
                                  action=rec.action, current=rec, alternatives=rest,
                                  parked="", park_reason="", retry_at=0.0)
    return Step(new, [plan])


def _failed(state: IncidentState, cause: Event, outcome: str, why: str, rules: Rules,
            now: float) -> Step:
    """The current attempt ran and did not fix it: record it, then a fresh diagnosis."""
    record = AttemptRecord(attempt=state.attempt, action=state.action,
                           params=dict(state.current.params) if state.current else {},
                           outcome=outcome, reason=why[:500],
                           symptoms_before=dict(state.symptoms))
    state = msgspec.structs.replace(state, history=[*state.history, record][-HISTORY_LIMIT:],
                                    plan_id="", parks=0)
    if _used(state) >= rules.max_attempts:
        return _escalate(state, cause, "max_attempts",
                         f"{_used(state)} attempt(s) failed ({_tried(state)}), the last: {why}")
    return request_diagnosis(state, cause, why, now)


def request_diagnosis(state: IncidentState, cause: Event, why: str, now: float) -> Step:
    """Ask for a fresh diagnosis on fresh observations, with the attempt history."""
    n = state.requests + 1
    req = DiagnosisRequested(id=derive_id("rediagnosis", state.incident_id, n),
                             incident_id=state.incident_id, causation_id=cause.id,
                             subject=state.subject, invariant=state.invariant,
                             reason=why[:500], attempt=state.attempt + 1,
                             history=list(state.history), symptoms=dict(state.symptoms),
                             excluded=list(state.excluded))
    new = msgspec.structs.replace(state, request_id=req.id, requests=n, requested_at=now,
                                  plan_id="", parked="", park_reason="", retry_at=0.0)
    return Step(new, [req])


def diagnosis_overdue(state: IncidentState, cause: Event, rules: Rules) -> Step | None:
    """No fresh diagnosis came in time: plan from the last one's untried leftovers."""
    if not state.request_id or state.closed:
        return None
    tried = {h.action for h in state.history}
    rest = [a for a in state.alternatives if a.action not in tried]
    state = msgspec.structs.replace(state, request_id="", alternatives=rest)
    return _next(state, cause, "no fresh diagnosis came in time; the last one's leftovers",
                 rules)


def _blocked(state: IncidentState, cause: Event, ending: Ending, kind: ObstacleKind,
             why: str, rules: Rules, now: float) -> Step:
    """The step did not run for a reason that is not the fix's fault: no attempt used."""
    state = msgspec.structs.replace(state, attempt=max(state.attempt - 1, 0), plan_id="")
    if ending == "refused":
        excluded = [*state.excluded, state.action] if state.action not in state.excluded \
            else state.excluded
        state = msgspec.structs.replace(state, excluded=excluded, current=None)
        return _next(state, cause, why, rules)
    parks = state.parks + 1
    if kind in ("kill", "mode"):
        delay = rules.park_retry_max_s  # woken by the governor's PolicyChanged
    else:
        delay = min(rules.park_retry_s * 2 ** min(parks - 1, 30), rules.park_retry_max_s)
    retry_at = now + delay
    event = IncidentParked(id=derive_id("parked", state.incident_id, state.plans),
                           incident_id=state.incident_id, causation_id=cause.id,
                           subject=state.subject, invariant=state.invariant, obstacle=kind,
                           reason=why[:500], attempt=state.attempt + 1, action=state.action,
                           retry_at=retry_at)
    new = msgspec.structs.replace(state, parked=kind, park_reason=why[:500], parks=parks,
                                  retry_at=retry_at)
    return Step(new, [event])


def unpark(state: IncidentState, cause: Event, rules: Rules, now: float) -> Step | None:
    """The obstacle lifted (or its backoff ran out): plan the same action again."""
    if not state.parked or state.closed:
        return None
    why = f"retry after {state.parked} ({state.park_reason})"
    rec = state.current
    steps = plan_steps(rec, state.subject, rules) if rec is not None else "none"
    if rec is None or isinstance(steps, str):
        return _next(msgspec.structs.replace(state, parked=""), cause, why, rules)
    return _plan(state, cause, rec, steps, list(state.alternatives), why)


def _on_escalated(state: IncidentState, event: Event, rules: Rules, now: float) -> Step | None:
    if isinstance(event, RetryRequested):
        who = f"{event.by} asked for a retry" + (f": {event.reason}" if event.reason else "")
        return reenter(state, event, who, now)
    if isinstance(event, IncidentUpdated) and math.isfinite(event.value) and event.value > 0:
        ref = state.escalated_value
        if ref <= 0:
            return Step(msgspec.structs.replace(state, escalated_value=event.value))
        ratio = max(ref, event.value) / min(ref, event.value)
        if ratio >= rules.reentry_factor:
            return reenter(state, event, f"the evidence changed: {event.invariant} moved from "
                                         f"{ref:g} to {event.value:g} since the escalation",
                           now)
    return None


def reenter(state: IncidentState, cause: Event, why: str, now: float) -> Step:
    """An escalated incident back in the loop: a fresh budget, a fresh diagnosis."""
    state = msgspec.structs.replace(state, closed="", reason="", attempt_base=state.attempt,
                                    reentries=state.reentries + 1, escalated_value=0.0,
                                    follows="", wants_human="", parks=0)
    return request_diagnosis(state, cause, why, now)


def follow(state: IncidentState, diagnosis: Diagnosis, leader: str, why: str) -> Step:
    """Instead of planning now, wait on `leader`'s remediation of the same subject."""
    plan_id = derive_id("follows", state.incident_id, leader)
    plan = Plan(id=plan_id, incident_id=state.incident_id, causation_id=diagnosis.id,
                subject=state.subject, plan_id=plan_id, invariant=state.invariant, attempt=0,
                steps=[], follows=leader, rationale=why)
    wants_human = (f"the diagnosis asks for a human: {diagnosis.hypothesis}"
                   if diagnosis.escalate else "")
    new = msgspec.structs.replace(state, follows=leader, attempt=0, plans=0, plan_id="",
                                  action="", current=None,
                                  alternatives=list(diagnosis.actions), closed="", reason="",
                                  wants_human=wants_human, symptoms=dict(diagnosis.symptoms))
    return Step(new, [plan])


def escalate_with(state: IncidentState, leader: IncidentEscalated) -> Step:
    return _escalate(state, leader, "with_leader",
                     f"escalated with incident {leader.incident_id}: {leader.reason}")


def plan_on_own(state: IncidentState, done_action: str, cause: Event, rules: Rules,
                now: float = 0.0) -> Step:
    """A follower whose leader's fix verified but which did not resolve (or whose leader's
    change failed): a fresh diagnosis of its own, knowing what already ran."""
    rest = [a for a in state.alternatives if a.action != done_action]
    state = msgspec.structs.replace(state, follows="", alternatives=rest)
    if state.wants_human:
        return _escalate(state, cause, "diagnosis", state.wants_human)
    why = (f"{done_action} settled on incident {cause.incident_id} but this one stayed broken"
           if done_action else f"incident {cause.incident_id}'s remediation did not settle")
    if done_action:
        record = AttemptRecord(attempt=0, action=done_action, outcome="ran_for_another",
                               reason=why, symptoms_before=dict(state.symptoms))
        state = msgspec.structs.replace(state, history=[*state.history, record])
    return request_diagnosis(state, cause, why, now)


def _escalate(state: IncidentState, cause: Event, category: str, reason: str) -> Step:
    tag = [state.reentries] if state.reentries else []
    esc = IncidentEscalated(id=derive_id("escalated", state.incident_id, *tag),
                            incident_id=state.incident_id, causation_id=cause.id,
                            subject=state.subject, invariant=state.invariant,
                            reason=reason, attempts=_used(state))
    new = msgspec.structs.replace(state, closed="escalated", reason=reason, plan_id="",
                                  request_id="", parked="")
    return Step(new, [esc], escalation=category)


# --- recurrence, per subject ------------------------------------------------------------


def recurrence(index: SubjectIndex, subject: str, invariant: str, incident: str, now: float,
               count: int, window_s: float) -> IncidentRecurring | None:
    """Note that `incident` of `invariant` opened now; the one recurrence escalation when
    this makes `count` incidents of it within `window_s` (once, until the window is
    quiet again). Mutates `index`."""
    index.recent = [r for r in index.recent if r[2] > now - window_s]
    if not any(r[1] == incident for r in index.recent):
        index.recent.append((invariant, incident, now))
    same = [r for r in index.recent if r[0] == invariant]
    if len(same) < 2:
        index.recurring.pop(invariant, None)  # quiet again: a new recurrence counts anew
    if len(same) < count or invariant in index.recurring:
        return None
    index.recurring[invariant] = now
    ids = [r[1] for r in same]
    return IncidentRecurring(
        id=derive_id("recurring", subject, invariant, ids[0]), incident_id=incident,
        subject=subject, invariant=invariant, count=len(same), window_s=window_s,
        incidents=ids,
        reason=f"{invariant} broke {len(same)} times on {subject} within {window_s:g}s: one "
               f"recurring problem for a human; the crew keeps fixing each occurrence")


