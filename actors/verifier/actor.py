"""The verifier: does the incident's own invariant hold again after a fix?

Two consumers feed one process:

- `verifier_obs` (Observation) keeps, per subject, the last few minutes of
  judgements: for each invariant of the subject, whether the observation is
  within its hysteresis limit (`clear`), using the same pure evaluation as
  the detector (subjects.invariants; baselines are learned here from the same
  observations). Every new observation wakes the checks of that subject
  through an asyncio.Condition: no polling, no fixed sleeps.
- `verifier` (IncidentOpened, IncidentResolved, PlanEnded). A plan that
  ended `succeeded` (every step of it, the governor's word) starts a check
  *inside the handler*: it awaits fresh observations (ts after its last step
  finished) until the invariant has held for `stable_window_s` (passed) or
  until `deadline_s` after that (failed; longer for an invariant whose metric
  settles slowly: its `settle_s` and the stable window, check_deadline_s). A
  multi-step repair is judged once, as a whole: compact, defragment and
  disarm are one fix. The runtime keeps
  the message alive with in_progress meanwhile, so if the verifier dies
  mid-check JetStream redelivers it and the check starts again; the
  verdict's id is derived from the PlanEnded's id, so at most one verdict per
  plan is ever recorded, whichever attempt publishes it. An IncidentResolved
  of the incident during the check passes it. A failed or blocked plan gets
  no verdict: the planner handles it.

Honest credit. A pass says who earned it (`recovered`): "after" when the
invariant was still broken as the step started and held after it finished;
"before" when it had already held for a stable window before the step started,
or the detector resolved the incident before the step finished (healthy, but
not thanks to the fix: incident memory learns nothing from it). The deadline
counts only while observations arrive: a gap longer than `stale_after_s` (the
monitor or the bus down) pauses it, and a check that waited `evidence_wait_s`
in total for evidence ends `inconclusive`, neither a pass nor a failed fix.

Remembering incidents across restarts. The check needs the incident's
invariant, which only IncidentOpened carries. Each one is recorded in the
KV bucket `menders_verifier` (key `incident.<incident_id>`, kept a week), so
a restarted verifier still knows incidents opened before it started. An
incident it cannot find at all is checked against every invariant of the
subject, and the verdict's reason says so.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

import subjects
from actors.runtime import Actor, Delivery, Runtime, follow_id
from actors.runtime.config import VerifierConfig
from actors.runtime.kv import Records
from actors.runtime.logs import get_logger
from bus_schemas import catalog
from bus_schemas.errors import MendersError
from bus_schemas.messages import (
    Event,
    IncidentOpened,
    IncidentResolved,
    Observation,
    PlanEnded,
    Recovery,
    Verdict,
)
from bus_schemas.verifier import IncidentRecord, incident_key
from subjects import invariants as inv
from subjects.base import SubjectDefinition

log = get_logger("menders.verifier")

KEEP_S = 300.0  # judgements kept per subject, well beyond any check's deadline
# A result that arrives late (a backlog) still gets a chance to see a full window.
LATE_GRACE_S = 5.0


class CheckHandedBack(MendersError):
    pass


class Judgement(msgspec.Struct, frozen=True):
    holds: bool
    value: float | None
    clear_limit: float
    down: bool


@dataclass
class SubjectWindow:
    """Recent judgements of one subject, and the condition checks wait on."""

    entries: deque[tuple[float, dict[str, Judgement]]] = field(default_factory=deque)
    learners: dict[str, inv.Learner] = field(default_factory=dict)
    last_seen: float = 0.0  # monotonic: when the last observation reached us
    # Replaced on every change and the old one set: a check awaits the one it
    # saw, so it cannot miss a change that lands while it evaluates.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def bump(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    def add(self, definition: SubjectDefinition, obs: Observation) -> None:
        self.last_seen = time.monotonic()
        if self.entries and obs.ts <= self.entries[-1][0]:
            return  # out of order: checks read entries in ts order
        judged: dict[str, Judgement] = {}
        for spec in inv.judged(definition.invariants, obs.metrics):
            sample = inv.sample_of(spec, obs.ts, obs.up, obs.metrics)
            learner, a = inv.assess(spec, self.learners.get(spec.name, inv.Learner()), sample)
            if a.value is not None and not a.breaking:
                learner = inv.learn(spec, learner, sample)
            self.learners[spec.name] = learner
            judged[spec.name] = Judgement(a.clear and not a.down, a.value, a.clear_limit, a.down)
        self.entries.append((obs.ts, judged))
        while self.entries and self.entries[0][0] < obs.ts - KEEP_S:
            self.entries.popleft()

    def stable_since(self, names: Sequence[str], after: float,
                     window_s: float) -> tuple[bool, str]:
        """Whether every named invariant held on every fresh observation for window_s."""
        since: float | None = None
        last = ""
        fresh = 0
        for ts, judged in self.entries:
            if ts <= after:
                continue  # stale: from before the execution finished
            fresh += 1
            bad = [n for n in names if not (judged.get(n) and judged[n].holds)]
            if bad:
                since = None
                last = _describe(bad[0], judged.get(bad[0]))
                continue
            since = ts if since is None else since
            if ts - since >= window_s:
                return True, f"held on {fresh} fresh observations for {ts - since:.1f}s"
        if not fresh:
            return False, "no fresh observation since the execution finished"
        if since is not None:
            return False, f"holding for {self.entries[-1][0] - since:.1f}s, not yet {window_s:g}s"
        return False, f"still broken: {last}"


    def held_through(self, names: Sequence[str], start: float, end: float) -> bool | None:
        """Whether every named invariant held on every observation in [start, end]; None
        when there is none to say."""
        seen = [judged for ts, judged in self.entries if start <= ts <= end]
        if not seen:
            return None
        return all(j.get(n) is not None and j[n].holds for j in seen for n in names)


def _describe(name: str, j: Judgement | None) -> str:
    if j is None:
        return f"{name}: metric missing"
    if j.down:
        return f"{name}: subject not answering"
    if j.value is None:
        return f"{name}: metric missing"
    return f"{name} = {j.value:.4g}, needs to be within {j.clear_limit:.4g}"


class Verifier(Actor):
    name = "verifier"

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        self.kv: Records[IncidentRecord] | None = None
        self.windows: dict[str, SubjectWindow] = {}
        self.incidents: dict[str, IncidentRecord] = {}
        m = rt.metrics
        self.verdicts = m.counter("menders_verdicts", "Verdicts, by outcome", ["outcome"])
        self.time_to_verdict = m.histogram(
            "menders_verifier_time_to_verdict_seconds",
            "From the execution's end to its verdict", ["outcome"],
            buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120))
        self.checks = m.gauge("menders_verifier_checks_in_flight", "Checks awaiting a verdict",
                              [])

    async def setup(self) -> None:
        assert self.rt.js is not None
        self.kv = Records(await self.rt.js.key_value(catalog.VERIFIER_BUCKET), IncidentRecord)

    def _definition(self, subject: str) -> SubjectDefinition | None:
        return subjects.definition_for(self.config, subject)

    def _window(self, subject: str) -> SubjectWindow:
        return self.windows.setdefault(subject, SubjectWindow())

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        if isinstance(event, Observation):
            await self._observe(event)
            return ()
        if isinstance(event, IncidentOpened):
            # In memory first, before any await: a result handled concurrently finds it.
            rec = IncidentRecord(subject=event.subject, invariant=event.invariant,
                                 opened_at=event.ts)
            self.incidents[event.incident_id] = rec
            await self._store(event.incident_id, rec)
            return ()
        if isinstance(event, IncidentResolved):
            await self._resolved(event)
            return ()
        if isinstance(event, PlanEnded):
            if event.outcome != "succeeded":
                return ()  # the planner handles it: no fix to verify
            return (await self._check(event),)
        return ()

    async def _observe(self, obs: Observation) -> None:
        definition = self._definition(obs.subject)
        if definition is None:
            return
        window = self._window(obs.subject)
        window.add(definition, obs)
        window.bump()

    async def _resolved(self, event: IncidentResolved) -> None:
        rec = self.incidents.get(event.incident_id) or await self._fetch(event.incident_id)
        if rec is None:
            rec = IncidentRecord(subject=event.subject, invariant=event.invariant,
                                 opened_at=event.ts)
        rec.resolved_at = event.ts
        self.incidents[event.incident_id] = rec
        self._window(event.subject).bump()
        await self._store(event.incident_id, rec)

    async def _store(self, incident_id: str, rec: IncidentRecord) -> None:
        assert self.kv is not None
        await self.kv.put(incident_key(incident_id), rec)

    async def _fetch(self, incident_id: str) -> IncidentRecord | None:
        assert self.kv is not None
        if not incident_id:
            return None
        got = await self.kv.get(incident_key(incident_id))
        if got is None:
            return None
        self.incidents[incident_id] = got.value
        return got.value

    # --- checks -------------------------------------------------------------------

    async def _check(self, result: PlanEnded) -> Verdict:
        vc = self.config.verifier
        finished = result.finished_at or result.ts
        started = result.started_at or finished
        rec = self.incidents.get(result.incident_id) or await self._fetch(result.incident_id)
        definition = self._definition(result.subject)
        names: list[str]
        note = ""
        if definition is None:
            return self._verdict(result, "", False, f"unknown subject {result.subject!r}",
                                 finished)
        if rec is not None and _has(definition, rec.invariant):
            names = [rec.invariant]
        else:
            names = [s.name for s in definition.invariants]
            note = " (incident unknown to the verifier: every invariant of the subject checked)"
        invariant = names[0] if len(names) == 1 else ""
        window = self._window(result.subject)

        def credit() -> Recovery:
            """Had it recovered before the step started? Then a pass is not the fix's.
            Asked at verdict time: observations from before the start may arrive late."""
            before = window.held_through(names, started - vc.stable_window_s, started)
            return "before" if before else "after"

        if rec is not None and rec.resolved_at is not None and rec.resolved_at < finished:
            return self._verdict(
                result, invariant, True, f"the detector resolved the incident "
                f"{finished - rec.resolved_at:.1f}s before the step finished: healthy, but "
                f"not thanks to it{note}", finished, "before")
        alert_only = invariant.startswith(inv.ALERT_PREFIX)
        deadline_s = check_deadline_s(vc, definition, names)
        budget = max(finished + deadline_s - time.time(), vc.stable_window_s + LATE_GRACE_S)
        deadline = time.monotonic() + budget
        paused = 0.0  # time without evidence: it does not count against the deadline
        tick = time.monotonic()
        self.checks.labels().inc()
        try:
            while True:
                changed = window.changed
                rec = self.incidents.get(result.incident_id, rec)
                if rec is not None and rec.resolved_at is not None and (
                    rec.resolved_at >= finished
                ):
                    return self._verdict(result, invariant, True,
                                         "the detector resolved the incident" + note, finished,
                                         credit())
                ok, why = window.stable_since(names, finished, vc.stable_window_s)
                if ok:
                    who = credit()
                    if who == "before":
                        why += "; it had already recovered before the step started"
                    return self._verdict(result, invariant, True, why + note, finished, who)
                now = time.monotonic()
                if now - (window.last_seen or tick) > vc.stale_after_s:
                    paused += now - tick  # no evidence: the deadline waits with us
                    deadline += now - tick
                tick = now
                if paused > vc.evidence_wait_s:
                    silent = now - window.last_seen if window.last_seen else paused
                    return self._verdict(
                        result, invariant, False, f"inconclusive: no observation of "
                        f"{result.subject} for {silent:.0f}s (monitor or bus unavailable); "
                        f"{why}{note}", finished, inconclusive=True)
                remaining = deadline - now
                if remaining <= 0 and alert_only:
                    # Only the alert can say, and it resolves on Alertmanager's clock
                    # (rule `for`, group_interval), not ours: no word is not a failure.
                    return self._verdict(
                        result, invariant, False, f"inconclusive: the alert behind "
                        f"{invariant} did not resolve within {budget:.0f}s; {why}{note}",
                        finished, inconclusive=True)
                if remaining <= 0:
                    reason = (f"{' and '.join(names)} did not hold for "
                              f"{vc.stable_window_s:g}s by the deadline: {why}{note}")
                    return self._verdict(result, invariant, False, reason, finished)
                await self._wait(changed, min(remaining, vc.stale_after_s))
        finally:
            self.checks.labels().dec()

    async def _wait(self, changed: asyncio.Event, within_s: float) -> None:
        """Until the subject's window changes, the timeout, or the actor stops.

        Stopping raises: the runtime naks the result, so the check is handed
        back and restarts in the next verifier instead of blocking shutdown.
        """
        waits = {asyncio.ensure_future(changed.wait()),
                 asyncio.ensure_future(self.rt.stopping.wait())}
        try:
            await asyncio.wait(waits, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.rt.stopping.is_set():
            raise CheckHandedBack("verifier stopping: check handed back for redelivery")

    def _verdict(self, result: PlanEnded, invariant: str, passed: bool, reason: str,
                 finished: float, recovered: Recovery = "", *,
                 inconclusive: bool = False) -> Verdict:
        outcome = "inconclusive" if inconclusive else "passed" if passed else "failed"
        self.verdicts.labels(outcome=outcome).inc()
        self.time_to_verdict.labels(outcome=outcome).observe(max(time.time() - finished, 0.0))
        log.info("verdict", extra={"plan_id": result.plan_id, "outcome": outcome,
                                   "recovered": recovered, "reason": reason[:300]})
        return Verdict(
            id=follow_id(result, "verdict"),
            incident_id=result.incident_id,
            causation_id=result.id,
            subject=result.subject,
            producer=self.name,
            plan_id=result.plan_id,
            invariant=invariant,
            passed=passed,
            reason=reason,
            recovered=recovered if passed else "",
            inconclusive=inconclusive,
        )


def check_deadline_s(vc: VerifierConfig, definition: SubjectDefinition,
                     names: Sequence[str]) -> float:
    """How long after the fix finished a check may wait for its stable window. An
    incident only an alert opened is judged by the alert resolving (alert_deadline_s);
    an invariant whose metric settles slowly (a count over a trailing window) gets its
    `settle_s` and the stable window, never less than deadline_s."""
    if len(names) == 1 and names[0].startswith(inv.ALERT_PREFIX):
        return vc.alert_deadline_s
    settle = max((s.settle_s for s in definition.invariants if s.name in names), default=0.0)
    return max(vc.deadline_s, settle + vc.stable_window_s)


def _has(definition: SubjectDefinition, name: str) -> bool:
    return name.startswith(inv.ALERT_PREFIX) or any(s.name == name
                                                    for s in definition.invariants)


ACTOR = Verifier
