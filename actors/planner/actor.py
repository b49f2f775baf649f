"""The planner actor: a plan per diagnosis, the next alternative on failure, then a human.

Attempt 1 is the diagnosis's top-ranked action as a one-step plan; the other
ranked actions are kept as alternatives. A failed verdict, a failed (or
timed out, unknown, cancelled, skipped) execution, or a veto or denial of the
current plan moves to the next alternative as attempt n+1. After
`planner.max_attempts` plans, or with no alternative left, the incident is
escalated (an IncidentEscalated event plus the webhook). A diagnosis that
asks for a human is escalated at once. A passed verdict or a resolved
incident closes the incident for the planner.

One cause often breaks several invariants at once (a leaked pool breaks
saturation, latency and error rate): each is its own incident, but they must
not each run a fix. An incident whose first action is the action already
under way for another open incident of the same subject *follows* that
leader: it gets a Plan with no steps and `follows` set, and runs nothing. If
the leader escalates, its followers escalate with it; if the leader's fix
verifies, each follower has `follow_grace_s` to resolve by itself and is then
planned on its own, without the action that already ran. Likewise, an
incident diagnosed while another fix of the subject is being verified, whose
diagnosis names a different fix or asks for a human, waits for that change
to settle (symptoms just after a fix often still carry the fault it fixed):
it is judged on its own after the grace, or at once if the change failed.
The per-subject
record of leaders and followers lives in the same bucket (key
`subject.<name>`), and a background loop plans the followers whose grace
ran out.

State: one JSON record per incident in the KV bucket `menders_planner`
(key: the incident id), written with compare-and-swap before the outputs
are published. Each record keeps the ids of the inputs already applied and
the outputs of the last one, so a redelivered input republishes exactly the
same events (same ids: the stream drops the copies) instead of planning
again, and a restarted planner carries on at the attempt it had reached.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec

import subjects
from actors.planner.escalation import EscalationWebhook
from actors.runtime import Actor, Delivery, Reject, derive_id
from actors.runtime.kv import Bucket, Records
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
from subjects.base import ActionError, ActionSpec

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
        if event.plan_id == state.plan_id and event.outcome in REFUSALS:
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


class Planner(Actor):
    name = "planner"

    async def setup(self) -> None:
        assert self.rt.js is not None
        bucket = Bucket(await self.rt.js.key_value(catalog.PLANNER_BUCKET))
        self.states = Records(bucket, IncidentState)
        self.indexes = Records(bucket, SubjectIndex)
        self.rules = Rules(self.config.planner.max_attempts, self._spec)
        self.lock = asyncio.Lock()  # the consumer and the grace loop share the index
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
        definition = subjects.definition_for(self.config, subject)
        return definition.actions.get(action) if definition is not None else None

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        if not event.incident_id:
            if isinstance(event, Diagnosis):
                raise Reject("a diagnosis without an incident id cannot be planned")
            return ()  # e.g. a kill decision that names no incident: not ours
        async with self.lock:
            return await self._handle(event)

    async def _handle(self, event: Event) -> Sequence[Event]:
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
        step, others = await self._correlate(step, event)
        seen = [*(state.seen if state else []), event.id][-SEEN_LIMIT:]
        new = msgspec.structs.replace(step.state, seen=seen, last_input=event.id,
                                      outbox=step.events + others, updated_at=time.time())
        await self._save(key, new, revision)  # before publishing: see the module doc
        self._count(step)
        self._notify(step.events + others)
        return step.events + others

    # --- one cause, one fix -------------------------------------------------------------

    async def _correlate(self, step: Step, event: Event) -> tuple[Step, list[Output]]:
        """Keep the subject's leader/follower index in step with this incident's step.

        Returns the (possibly rewritten) step and events for other incidents
        (followers escalated with their leader).
        """
        st = step.state
        index, rev = await self._load_index(st.subject)
        others: list[Output] = []
        incident = st.incident_id
        plan = next((e for e in step.events if isinstance(e, Plan)), None)
        if isinstance(event, Diagnosis) and (plan is not None or step.state.closed):
            action = plan.steps[0].action if plan is not None else ""
            others_active = {i: a for i, a in index.leaders.items() if i != incident}
            same = next((i for i, a in others_active.items() if a == action), None)
            if same is not None:
                step = follow(st, event, same, f"{action} is already under way for incident "
                                               f"{same}: one cause, one fix")
                index.followers[incident] = same
            elif others_active:
                # A change is being verified on this subject: symptoms seen now may be its
                # tail. Let it settle before piling a second change (or a page) on top.
                leader, running = next(iter(others_active.items()))
                what = f"{action}" if action else "a human"
                step = follow(st, event, leader, f"{running} on incident {leader} is settling; "
                                                 f"{what} waits for it")
                index.followers[incident] = leader
                index.settling.append(incident)
            elif plan is not None:
                index.leaders[incident] = action
        elif plan is not None and incident in index.leaders:
            index.leaders[incident] = plan.steps[0].action
        if step.state.closed:
            index.followers.pop(incident, None)
            index.waiting.pop(incident, None)
            index.done_action.pop(incident, None)
            if incident in index.settling:
                index.settling.remove(incident)
            if index.leaders.pop(incident, None) is not None:
                mine = [f for f, lead in index.followers.items() if lead == incident]
                for f in mine:
                    del index.followers[f]
                    settling = f in index.settling
                    if step.state.closed == "escalated" and not settling:
                        esc = next(e for e in step.events if isinstance(e, IncidentEscalated))
                        others += await self._escalate_follower(f, esc)
                    elif step.state.closed == "escalated":
                        index.waiting[f] = time.time()  # the change settled badly: own plan now
                        index.done_action[f] = ""
                    else:
                        index.waiting[f] = time.time() + self.config.planner.follow_grace_s
                        index.done_action[f] = st.action
        await self._save_index(st.subject, index, rev)
        return step, others

    async def _escalate_follower(self, incident: str, leader: IncidentEscalated) -> list[Output]:
        key = state_key(incident)
        state, rev = await self._load(key)
        if state is None or state.closed:
            return []
        step = escalate_with(state, leader)
        await self._save(key, msgspec.structs.replace(step.state, updated_at=time.time()), rev)
        self._count(step)
        return list(step.events)

    async def _grace_loop(self) -> None:
        """Plan, on its own, each follower whose leader's fix verified but which stayed broken."""
        while True:
            await asyncio.sleep(1.0)
            for subject in self.config.subjects:
                async with self.lock:
                    events = await self._expire_waiting(subject)
                for e in events:
                    await self.rt.publish(e)
                self._notify(events)

    async def _expire_waiting(self, subject: str) -> list[Output]:
        index, rev = await self._load_index(subject)
        now = time.time()
        due = [f for f, deadline in index.waiting.items() if deadline <= now]
        if not due:
            return []
        out: list[Output] = []
        for f in due:
            done = index.done_action.pop(f, "")
            del index.waiting[f]
            if f in index.settling:
                index.settling.remove(f)
            key = state_key(f)
            state, srev = await self._load(key)
            if state is None or state.closed:
                continue
            cause = Event(id=derive_id("grace", f), incident_id=state.follows, subject=subject)
            step = plan_on_own(state, done, cause, self.rules)
            plan = next((e for e in step.events if isinstance(e, Plan)), None)
            if plan is not None:
                index.leaders[f] = plan.steps[0].action
            await self._save(key, msgspec.structs.replace(step.state, updated_at=now), srev)
            self._count(step)
            out += step.events
        await self._save_index(subject, index, rev)
        return out

    async def _load_index(self, subject: str) -> tuple[SubjectIndex, int | None]:
        got = await self.indexes.get(index_key(subject))
        return (SubjectIndex(), None) if got is None else (got.value, got.revision)

    def background(self) -> Sequence[Callable[[], Awaitable[None]]]:
        return (self._grace_loop,)

    async def _load(self, key: str) -> tuple[IncidentState | None, int | None]:
        got = await self.states.get(key)
        return (None, None) if got is None else (got.value, got.revision)

    # Compare-and-swap saves: a concurrent writer makes them raise KvConflict, the
    # input is nak'ed and re-applied to the fresher state.
    async def _save(self, key: str, state: IncidentState, revision: int | None) -> None:
        await self.states.save(key, state, revision)

    async def _save_index(self, subject: str, index: SubjectIndex, revision: int | None) -> None:
        await self.indexes.save(index_key(subject), index, revision)

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
