"""The planner actor: a plan per diagnosis, a fresh diagnosis after a failed attempt,
parking while something outside the fix holds it back, then a human.

The rules are pure (actors/planner/attempts.py). Attempt 1 is the diagnosis's
top-ranked action as a one-step plan. An attempt that ran and failed (failed
verdict; failed, timed-out or unknown step) is recorded, and the planner asks
the diagnoser for a fresh diagnosis (DiagnosisRequested, with the attempt
history); the Diagnosis that answers it (its `request_id`) is planned as
attempt n+1. A step held back by the kill switch, observe mode, a rate window,
an approval nobody gave or an expiry *parks* the incident (IncidentParked, no
attempt used); a human's denial, an operator's revocation or an allow-list veto
excludes that action and plans the next at once. After `planner.max_attempts`
attempts, or with nothing new to try, the incident is escalated (an
IncidentEscalated event plus the webhook), which is not the end: it stays in
the planner's index (gauge, webhook reminders with backoff) and re-enters on
`menders retry` or an update whose value moved by `reentry_factor`; it ends
when the detector resolves it.

One cause often breaks several invariants at once (a leaked pool breaks
saturation, latency and error rate): each is its own incident, but they must
not each run a fix. An incident whose first action is the action already
under way for another open incident of the same subject *follows* that
leader: it gets a Plan with no steps and `follows` set, and runs nothing. If
the leader escalates, its followers escalate with it; if the leader's fix
verifies, each follower has `follow_grace_s` to resolve by itself and is then
diagnosed afresh on its own, knowing the action that already ran. Likewise, an
incident diagnosed while another fix of the subject is being verified, whose
diagnosis names a different fix or asks for a human, waits for that change
to settle (symptoms just after a fix often still carry the fault it fixed).

Background, once a second per subject: plan followers whose grace ran out,
parked incidents whose backoff ran out (a resume or mode change, the
governor's PolicyChanged, wakes them at once), incidents whose re-diagnosis
was never answered (`rediagnosis_timeout_s`: the last diagnosis's untried
leftovers), and remind the webhook of escalated incidents still broken.

Recurrence: the same invariant opening `recurrence_count` times on one subject
within `recurrence_window_s` is escalated once as one recurring problem
(IncidentRecurring plus the webhook); each occurrence is still planned.

State: one JSON record per incident in the KV bucket `menders_planner`
(key: the incident id), written with compare-and-swap before the outputs
are published. Each record keeps the ids of the inputs already applied and
the outputs of the last one, so a redelivered input republishes exactly the
same events (same ids: the stream drops the copies) instead of planning
again, and a restarted planner carries on at the attempt it had reached.
The per-subject index (key `subject.<name>`) holds leaders, followers,
parked, diagnosing and escalated incidents and the recent openings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence

import msgspec

import subjects
from actors.planner.attempts import (
    SEEN_LIMIT,
    IncidentState,
    Output,
    Rules,
    Step,
    SubjectIndex,
    apply,
    diagnosis_overdue,
    escalate_with,
    follow,
    index_key,
    plan_on_own,
    recurrence,
    state_key,
    unpark,
)
from actors.planner.escalation import EscalationWebhook
from actors.runtime import Actor, Delivery, Reject, derive_id
from actors.runtime.kv import Bucket, Records
from actors.runtime.outage import ride_through
from bus_schemas import catalog
from bus_schemas.messages import (
    Diagnosis,
    DiagnosisRequested,
    Event,
    IncidentEscalated,
    IncidentParked,
    IncidentRecurring,
    Plan,
    PolicyChanged,
    RetryRequested,
)
from subjects.base import ActionSpec

log = logging.getLogger("menders.planner")

TICK_S = 1.0
# Crash points of the planner, for tests: `_reached(point)` is called at each.
CRASH_POINTS = ("tick_committed",)
WOKEN_BY_POLICY = ("kill", "mode")  # parked kinds a PolicyChanged lifts


class Planner(Actor):
    name = "planner"

    async def setup(self) -> None:
        assert self.rt.js is not None
        bucket = Bucket(await self.rt.js.key_value(catalog.PLANNER_BUCKET))
        self.states = Records(bucket, IncidentState)
        self.indexes = Records(bucket, SubjectIndex)
        cfg = self.config.planner
        self.rules = Rules(cfg.max_attempts, self._spec, park_retry_s=cfg.park_retry_s,
                           park_retry_max_s=cfg.park_retry_max_s,
                           reentry_factor=cfg.reentry_factor)
        self.lock = asyncio.Lock()  # the consumer and the background loop share the index
        metrics = self.rt.metrics
        self.plans = metrics.counter("menders_plans", "Plans made, by attempt", ["attempt"])
        self.escalations = metrics.counter(
            "menders_escalations", "Incidents escalated to a human, by reason "
            "(diagnosis, max_attempts, no_alternatives, no_actions, nothing_new, with_leader)",
            ["reason"])
        self.parks = metrics.counter(
            "menders_planner_parks", "Incidents parked, by obstacle (kill, mode, limit, "
            "approval, expired, other)", ["obstacle"])
        self.rediagnoses = metrics.counter(
            "menders_planner_rediagnoses", "Fresh diagnoses asked for", [])
        self.recurrences = metrics.counter(
            "menders_planner_recurrences", "Recurring problems escalated", [])
        self.g_escalated = metrics.gauge(
            "menders_planner_escalated_open", "Escalated incidents still broken, by subject",
            ["subject"])
        self.g_parked = metrics.gauge(
            "menders_planner_parked", "Parked incidents, by subject", ["subject"])
        self.webhook = EscalationWebhook(
            cfg.escalation_webhook,
            metrics.counter("menders_escalation_webhook", "Escalation webhook POSTs, by "
                            "outcome (sent, failed)", ["outcome"]),
            fmt=cfg.escalation_format,
            routing_key=os.environ.get(cfg.escalation_routing_key_env, ""))

    async def teardown(self) -> None:
        await self.webhook.close()

    def _spec(self, subject: str, action: str) -> ActionSpec | None:
        definition = subjects.definition_for(self.config, subject)
        return definition.actions.get(action) if definition is not None else None

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        if isinstance(event, PolicyChanged):
            async with self.lock:
                await self._wake_parked(event)
            return ()
        if not event.incident_id:
            if isinstance(event, Diagnosis | RetryRequested):
                raise Reject(f"a {type(event).__name__} without an incident id names no "
                             "incident to plan")
            return ()  # e.g. a kill decision that names no incident: not ours
        async with self.lock:
            return await self._handle(event)

    async def _handle(self, event: Event) -> Sequence[Event]:
        key = state_key(event.incident_id)
        # The incident's state and its subject's index in one round trip: most inputs
        # need both (the index is re-read below if the subject turns out otherwise).
        (state, revision), index = await asyncio.gather(self._load(key),
                                                        self._load_index(event.subject))
        if state is not None and event.id in state.seen:
            if event.id != state.last_input:
                return ()
            log.info("replaying the outputs of a redelivered input")
            self._notify(state.outbox)
            return state.outbox
        if isinstance(event, RetryRequested) and state is None:
            raise Reject(f"menders retry: the planner knows no incident {event.incident_id!r}")
        now = time.time()
        step = apply(state, event, self.rules, now)
        if step is None:
            if isinstance(event, RetryRequested):
                log.info("retry asked for an incident being worked: nothing to do",
                         extra={"closed": state.closed if state else ""})
            return ()
        first = state is None and isinstance(event, Diagnosis)
        step, others = await self._correlate(step, event, first, now, index)
        seen = [*(state.seen if state else []), event.id][-SEEN_LIMIT:]
        new = msgspec.structs.replace(step.state, seen=seen, last_input=event.id,
                                      outbox=step.events + others, updated_at=now)
        await self._save(key, new, revision)  # before publishing: see the module doc
        self._count(step)
        self._notify(step.events + others)
        return step.events + others

    # --- one cause, one fix -------------------------------------------------------------

    async def _correlate(self, step: Step, event: Event, first: bool, now: float,
                         loaded: tuple[SubjectIndex, int | None] | None = None,
                         ) -> tuple[Step, list[Output]]:
        """Keep the subject's index in step with this incident's step (`loaded`: the
        index of event.subject, read with the incident's state).

        Returns the (possibly rewritten) step and events for other incidents
        (followers escalated with their leader) or about the subject (recurrence).
        """
        st = step.state
        if loaded is None or st.subject != event.subject:
            loaded = await self._load_index(st.subject)
        index, rev = loaded
        others: list[Output] = []
        incident = st.incident_id
        if first:
            cfg = self.config.planner
            rec = recurrence(index, st.subject, st.invariant, incident, now,
                             cfg.recurrence_count, cfg.recurrence_window_s)
            if rec is not None:
                others.append(rec)
        plan = next((e for e in step.events if isinstance(e, Plan)), None)
        if (isinstance(event, Diagnosis) and not event.request_id
                and (plan is not None or step.state.closed)):
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
        elif plan is not None and plan.steps:
            index.leaders[incident] = plan.steps[0].action
        if step.state.closed:
            others += await self._closed(index, step)
        self._book(index, step.state, now)
        await self._save_index(st.subject, index, rev)
        return step, others

    async def _closed(self, index: SubjectIndex, step: Step) -> list[Output]:
        incident = step.state.incident_id
        others: list[Output] = []
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
                    others += await self._escalate_follower(f, esc, index)
                elif step.state.closed == "escalated":
                    index.waiting[f] = time.time()  # the change settled badly: own look now
                    index.done_action[f] = ""
                else:
                    index.waiting[f] = time.time() + self.config.planner.follow_grace_s
                    index.done_action[f] = step.state.action
        return others

    def _book(self, index: SubjectIndex, st: IncidentState, now: float) -> None:
        """Parked, diagnosing and escalated incidents, as the background loop needs them."""
        i = st.incident_id
        if st.parked:
            index.parked[i] = st.retry_at
            index.parked_kind[i] = st.parked
        else:
            index.parked.pop(i, None)
            index.parked_kind.pop(i, None)
        if st.request_id:
            index.diagnosing[i] = st.requested_at + self.config.planner.rediagnosis_timeout_s
        else:
            index.diagnosing.pop(i, None)
        if st.closed == "escalated":
            index.escalated.setdefault(i, now + self.config.planner.reminder_s)
        else:
            index.escalated.pop(i, None)
            index.reminders.pop(i, None)

    async def _escalate_follower(self, incident: str, leader: IncidentEscalated,
                                 index: SubjectIndex) -> list[Output]:
        key = state_key(incident)
        state, rev = await self._load(key)
        if state is None or state.closed:
            return []
        step = escalate_with(state, leader)
        now = time.time()
        await self._save(key, msgspec.structs.replace(step.state, updated_at=now), rev)
        self._book(index, step.state, now)
        self._count(step)
        return list(step.events)

    async def _wake_parked(self, change: PolicyChanged) -> None:
        """A resume or a mode change: what the kill switch or the mode held back is due."""
        now = time.time()
        for subject in self.config.subjects:
            index, rev = await self._load_index(subject)
            due = [i for i, kind in index.parked_kind.items() if kind in WOKEN_BY_POLICY]
            if not due:
                continue
            for i in due:
                index.parked[i] = now
            await self._save_index(subject, index, rev)
            log.info("parked incidents woken", extra={"change": change.change,
                                                      "subject": subject, "count": len(due)})

    # --- the background loop --------------------------------------------------------------

    async def _tick_loop(self) -> None:
        """Publish-safe like a handler: a tick's events are saved in the subject index's
        outbox with its changes, published, then cleared; a planner that died in
        between re-publishes them on its next tick (same ids: dedup drops copies)."""
        while True:
            await asyncio.sleep(TICK_S)
            for subject in self.config.subjects:
                async with self.lock:
                    events, fresh = await self._tick(subject)
                if events:
                    await self._reached("tick_committed")
                for e in events:
                    await self.rt.publish(e)
                self._notify(fresh)
                if events:
                    async with self.lock:
                        await self._clear_outbox(subject, {e.id for e in events})

    async def _reached(self, point: str) -> None:
        """A named crash point (CRASH_POINTS): state committed, events not yet out.
        Tests override it to stop the process there."""

    async def _clear_outbox(self, subject: str, published: set[str]) -> None:
        index, rev = await self._load_index(subject)
        if any(e.id in published for e in index.outbox):
            index.outbox = [e for e in index.outbox if e.id not in published]
            await self._save_index(subject, index, rev)

    async def _tick(self, subject: str) -> tuple[list[Output], list[Output]]:
        """(everything to publish: the leftovers of a tick that died first, then this
        tick's own events; this tick's own events)."""
        index, rev = await self._load_index(subject)
        now = time.time()
        leftover = list(index.outbox)
        out: list[Output] = []
        changed = False
        for f in [f for f, deadline in index.waiting.items() if deadline <= now]:
            changed = True
            done = index.done_action.pop(f, "")
            del index.waiting[f]
            if f in index.settling:
                index.settling.remove(f)
            out += await self._advance(index, f, now, self._on_own(done, now),
                                       cause_of=lambda s: s.follows, tag="grace")
        for i in [i for i, at in index.parked.items() if at <= now]:
            changed = True
            out += await self._advance(index, i, now, lambda s, c: unpark(
                s, c, self.rules, now), tag=f"unpark{index.parked[i]}")
        for i in [i for i, at in index.diagnosing.items() if at <= now]:
            changed = True
            out += await self._advance(index, i, now, lambda s, c: diagnosis_overdue(
                s, c, self.rules), tag="overdue")
        for i in [i for i, at in index.escalated.items() if at <= now]:
            changed = True
            n = index.reminders.get(i, 0) + 1
            index.reminders[i] = n
            cfg = self.config.planner
            index.escalated[i] = now + min(cfg.reminder_s * 2 ** min(n, 30), cfg.reminder_max_s)
            self.webhook.remind(i, subject, n)
        self.g_escalated.labels(subject=subject).set(len(index.escalated))
        self.g_parked.labels(subject=subject).set(len(index.parked))
        if out:
            index.outbox = leftover + out
        if changed or out:
            await self._save_index(subject, index, rev)
        return leftover + out, out

    def _on_own(self, done: str, now: float) -> Callable[[IncidentState, Event], Step | None]:
        return lambda state, cause: plan_on_own(state, done, cause, self.rules, now)

    async def _advance(self, index: SubjectIndex, incident: str, now: float,
                       rule: Callable[[IncidentState, Event], Step | None],
                       cause_of: Callable[[IncidentState], str] = lambda s: s.incident_id,
                       tag: str = "") -> list[Output]:
        """Apply one background rule to one incident of the index."""
        key = state_key(incident)
        state, srev = await self._load(key)
        if state is None or state.closed in ("resolved", "verified"):
            index.parked.pop(incident, None)
            index.parked_kind.pop(incident, None)
            index.diagnosing.pop(incident, None)
            return []
        cause = Event(id=derive_id("tick", incident, tag, state.plans, state.requests),
                      incident_id=cause_of(state) or incident, subject=state.subject)
        step = rule(state, cause)
        if step is None:
            self._book(index, state, now)
            return []
        plan = next((e for e in step.events if isinstance(e, Plan)), None)
        if plan is not None and plan.steps:
            index.leaders[incident] = plan.steps[0].action
        if step.state.closed:
            extra = await self._closed(index, step)
        else:
            extra = []
        self._book(index, step.state, now)
        await self._save(key, msgspec.structs.replace(step.state, outbox=step.events + extra,
                                                      updated_at=now), srev)
        self._count(step)
        return step.events + extra

    async def _load_index(self, subject: str) -> tuple[SubjectIndex, int | None]:
        got = await self.indexes.get(index_key(subject))
        return (SubjectIndex(), None) if got is None else (got.value, got.revision)

    def background(self) -> Sequence[Callable[[], Awaitable[None]]]:
        # Re-run from the top after a broker outage: each tick reloads its state from KV.
        return (ride_through("planner tick loop", self._tick_loop),)

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
                if e.steps:
                    self.plans.labels(attempt=str(e.attempt)).inc()
                    log.info("planned", extra={"attempt": e.attempt, "plan_id": e.plan_id,
                                               "action": e.steps[0].action})
            elif isinstance(e, IncidentParked):
                self.parks.labels(obstacle=e.obstacle).inc()
                log.info("parked", extra={"obstacle": e.obstacle, "reason": e.reason[:200]})
            elif isinstance(e, DiagnosisRequested):
                self.rediagnoses.labels().inc()
                log.info("fresh diagnosis asked", extra={"attempt": e.attempt,
                                                         "reason": e.reason[:200]})
            elif isinstance(e, IncidentEscalated):
                self.escalations.labels(reason=step.escalation).inc()
                log.warning("escalated", extra={"reason": e.reason, "attempts": e.attempts})

    def _notify(self, events: Sequence[Output]) -> None:
        for e in events:
            if isinstance(e, IncidentEscalated):
                self.webhook.notify(e)
            elif isinstance(e, IncidentRecurring):
                self.recurrences.labels().inc()
                log.warning("recurring", extra={"invariant": e.invariant, "count": e.count})
                self.webhook.notify_recurring(e)


ACTOR = Planner
