"""The planner actor: a plan per diagnosis, the next alternative on failure, then a human.

Attempt 1 is the diagnosis's top-ranked action as a one-step plan; the other
ranked actions are kept as alternatives. A failed verdict, a failed (or
timed out, unknown, cancelled, skipped) execution, or a Decision that ends the
current plan's step (a veto, a denial, or any with `ends_step`: revoked before
release, expired unreported) moves to the next alternative as attempt n+1. After
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
    escalate_with,
    follow,
    index_key,
    plan_on_own,
    state_key,
)
from actors.planner.escalation import EscalationWebhook
from actors.runtime import Actor, Delivery, Reject, derive_id
from actors.runtime.kv import Bucket, Records
from bus_schemas import catalog
from bus_schemas.messages import (
    Diagnosis,
    Event,
    IncidentEscalated,
    Plan,
)
from subjects.base import ActionSpec

log = logging.getLogger("menders.planner")

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
