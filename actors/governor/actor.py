"""The safety governor: the only actor that may approve an execution.

It judges every plan step against policy (actors/governor/policy.py, pure) and keeps
everything it must remember in its KV bucket, so a restarted governor
honours the same mode, kill switch, approvals and rate windows:

  mode, kill, revoked.<id>   shared with the operator and executors (bus_schemas.governor)
  limits                      rate windows, in-flight slots, cooldowns (policy.Usage)
  plan.<hash of plan_id>      each plan's progress: every step's status and the
                              events published for it (PlanProgress)
  pending.<execution_id>      a step waiting for `menders approve|deny`; once settled
                              it is kept, marked, until its events surely went out

Each handler reads state, decides, writes state (compare-and-swap), then
returns its events; their ids are derived from the execution id, so a
redelivered message (after a crash between write and publish) re-emits the
recorded events and JetStream dedup drops copies that had landed. The
background loop (approval timeouts, expired slots) publishes itself, so it
keeps the marker (a settled pending, an expired slot) until it has published,
and a restarted governor re-publishes whatever a marker still names.

Every step ends in a message the planner can act on: an ExecutionResult from
an executor, or a Decision with `ends_step` (vetoed, denied, revoked before
release, or `expired`: released but no executor reported before its slot ran out).

Keys that can no longer matter are deleted (the bucket has no TTL: that would
expire the kill flag and the mode): settled pendings once published, a plan's
progress PLAN_KEEP_S after its last step ended, a revocation once its execution
ended (or could no longer start).

Fail closed: an unreadable kill flag counts as engaged, a missing mode as
observe, an unknown subject or an unloadable registry vetoes. Only the
governor's resume releases the kill switch; a release it did not make is undone
and reported (KillReengaged).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, cast

import msgspec

import subjects
from actors.governor import policy, waves
from actors.runtime import Actor, Delivery, Reject, derive_id, killswitch
from actors.runtime.killswitch import read_kill
from actors.runtime.kv import Bucket, Records, watch_forever
from actors.runtime.logs import get_logger
from actors.runtime.outage import ride_through
from bus_schemas import catalog
from bus_schemas.governor import (
    FORGED_RELEASE,
    KILL_KEY,
    MISSING_KILL,
    MODE_KEY,
    PENDING_PREFIX,
    REVOKED_PREFIX,
    UNREADABLE_KILL,
    KillFlag,
    Pending,
    Revocation,
    encode_kill,
    encode_mode,
    encode_revocation,
    parse_kill,
    parse_mode,
    parse_revocation,
    plan_revoked_key,
    revoked_key,
)
from bus_schemas.messages import (
    MAX_APPROVAL_TTL_S,
    ControlCommand,
    Decision,
    DecisionOutcome,
    Event,
    ExecutionApproved,
    ExecutionResult,
    HumanApproval,
    KillReengaged,
    Mode,
    Plan,
    PlanEnded,
    PlanProgressed,
    PlanStep,
    PolicyChanged,
    StepEnding,
)
from subjects.base import ActionSpec

log = get_logger("menders.governor")

LIMITS_KEY = "limits"
# The policy state one message is judged on: mode, kill engaged, usage and its revision.
PolicyReads = tuple[Mode, bool, policy.Usage, int]
PLAN_PREFIX = "plan."
TICK_S = 0.5  # the background loop's period
PLAN_KEEP_S = 3600.0  # a finished plan's progress is kept this long: a redelivery is known
# A settled pending is kept this long after its events were returned to the runtime, so
# a redelivered approval (publish failed, nak) re-emits instead of finding nothing.
SETTLED_KEEP_S = 120.0
# A revocation older than this can concern nothing that may still start or run: every
# approval expires within MAX_APPROVAL_TTL_S and every step has a timeout.
REVOKED_KEEP_S = 2 * MAX_APPROVAL_TTL_S
PURGE_EVERY_S = 30.0

StepStatus = Literal[
    "waiting", "awaiting_approval", "approved", "succeeded", "failed", "vetoed", "denied",
    "revoked", "skipped",
]
NOT_SUCCEEDED = ("failed", "vetoed", "denied", "revoked", "skipped")
IN_FLIGHT = ("approved", "awaiting_approval")  # holding a place among the plan's parallel
ENDED = ("succeeded", *NOT_SUCCEEDED)
# Crash points of the governor, for tests: `_reached(point)` is called at each.
CRASH_POINTS = ("plan_committed", "settle_progress_saved", "approval_committed",
                "expiry_committed", "slot_expiry_committed")


class StepState(msgspec.Struct, kw_only=True):
    execution_id: str
    status: StepStatus = "waiting"
    detail: str = ""
    events: list[ExecutionApproved | Decision] = []  # what was published for this step
    released: bool = False
    disruptive: bool = False  # the registry's word, once judged
    ended: str = ""  # the Decision outcome or ExecutionStatus that ended it
    rule: str = ""
    started_at: float = 0.0  # as its executor reported
    finished_at: float = 0.0
    ended_at: float = 0.0  # when the governor learned it ended


class PlanProgress(msgspec.Struct, kw_only=True):
    plan: Plan
    steps: dict[str, StepState]
    ended_at: float = 0.0  # when its last step ended; purged PLAN_KEEP_S later
    waves_started: list[int] = []
    waves_finished: list[int] = []
    # The plan's own events (waves, its end), re-emitted with the steps' on redelivery.
    events: list[PlanProgressed | PlanEnded] = []
    revoked: str = ""  # why the whole plan was revoked: no step starts any more


def execution_id_for(plan_id: str, step_id: str) -> str:
    """Deterministic: the same plan step always gets the same execution id."""
    return derive_id("exec", plan_id, step_id)


def plan_key(plan_id: str) -> str:
    return PLAN_PREFIX + derive_id("plan", plan_id)  # plan ids may hold non-key characters


class Governor(Actor):
    name = "governor"
    plan_keep_s = PLAN_KEEP_S
    purge_every_s = PURGE_EVERY_S

    async def setup(self) -> None:
        assert self.rt.js is not None
        self.cfg = self.config.governor
        self.kv = Bucket(await self.rt.js.key_value(catalog.GOVERNOR_BUCKET))
        self.limits = Records(self.kv, policy.Usage)
        self.plans = Records(self.kv, PlanProgress)
        self.pendings = Records(self.kv, Pending)
        self.lock = asyncio.Lock()  # the consumer and the expiry loop share state
        await self.kv.create_bytes(MODE_KEY, encode_mode(self.cfg.mode))  # kept if it exists
        self.pending: dict[str, Pending] = {}  # waiting for a human
        self.settled: dict[str, Pending] = {}  # settled, key not deleted yet
        for key in await self.kv.keys(PENDING_PREFIX):
            got = await self.pendings.get(key)
            if got is not None:
                into = self.settled if got.value.settled_at else self.pending
                into[got.value.execution_id] = got.value
        self.next_purge = 0.0
        m = self.rt.metrics
        self.m_decisions = m.counter("menders_governor_decisions",
                                     "Governor decisions by outcome", ["outcome"])
        self.m_pending = m.gauge("menders_governor_pending_approvals",
                                 "Executions waiting for a human", []).labels()
        self.m_kill = m.gauge("menders_governor_kill_engaged", "1 while the kill switch is "
                              "engaged", []).labels()
        self.m_pending.set(len(self.pending))
        log.info("governor ready", extra={"mode": await self._mode(),
                                          "pending": len(self.pending)})

    def background(self) -> Sequence[Callable[[], Awaitable[None]]]:
        # The expiry loop re-runs from the top after a broker outage: its opening
        # re-publish of settled pendings reuses their ids, so dedup drops copies.
        return (ride_through("governor expiry loop", self._expire_loop, logger=log),
                self._watch_kill)

    async def _reached(self, point: str) -> None:
        """A named crash point (CRASH_POINTS): state committed, events not yet out.
        Tests override it to stop the process exactly there."""

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        async with self.lock:
            if isinstance(event, Plan):
                out = await self._on_plan(event, delivery.redelivered)
            elif isinstance(event, ExecutionResult):
                out = await self._on_result(event, delivery.redelivered)
            elif isinstance(event, HumanApproval):
                out = await self._on_approval(event, delivery.redelivered)
            elif isinstance(event, ControlCommand):
                out = await self._on_control(event, delivery.redelivered)
            else:
                raise Reject(f"the governor does not handle {type(event).__name__}")
        self._count(out)
        return out

    def _count(self, events: Sequence[Event]) -> None:
        for e in events:
            if isinstance(e, Decision | ExecutionApproved):
                self.m_decisions.labels(outcome=e.outcome if isinstance(e, Decision)
                                        else "approved").inc()

    # --- state ------------------------------------------------------------------------

    async def _mode(self) -> Mode | None:
        return parse_mode(await self.kv.get_bytes(MODE_KEY))

    async def _kill(self) -> KillFlag:
        return await read_kill(self.kv)

    async def _read_policy_state(self) -> tuple[Mode, bool]:
        mode, kill = await asyncio.gather(self._mode(), self._kill())
        return mode or "observe", kill.engaged  # no mode written: fail closed

    async def _policy_reads(self) -> PolicyReads:
        """Mode, kill flag and usage: fresh reads, all at once (one round trip)."""
        (mode, kill), (usage, urev) = await asyncio.gather(self._read_policy_state(),
                                                           self._usage())
        return mode, kill, usage, urev

    async def _usage(self) -> tuple[policy.Usage, int]:
        got = await self.limits.get(LIMITS_KEY)
        return (policy.Usage(), 0) if got is None else (got.value, got.revision)

    async def _save_usage(self, usage: policy.Usage, rev: int) -> None:
        """CAS write: a conflict raises, the message is nak'ed and judged again."""
        await self.limits.save(LIMITS_KEY, usage, rev or None)

    async def _save_progress(self, prog: PlanProgress, rev: int) -> None:
        """CAS write, like _save_usage."""
        if not prog.ended_at and all(st.status in ENDED for st in prog.steps.values()):
            prog.ended_at = time.time()
        await self.plans.save(plan_key(prog.plan.plan_id), prog, rev or None)

    async def _progress(self, plan_id: str) -> tuple[PlanProgress | None, int]:
        got = await self.plans.get(plan_key(plan_id))
        return (None, 0) if got is None else (got.value, got.revision)

    def _actions(self, subject: str) -> tuple[str, dict[str, ActionSpec], str]:
        """(kind, registered actions, why none) for a managed subject."""
        sc = self.config.subjects.get(subject)
        if sc is None:
            return "", {}, f"subject {subject!r} is not configured"
        try:
            return sc.kind, subjects.definition_of(sc).actions, ""
        except Exception as exc:  # an unloadable registry vetoes everything: fail closed
            return sc.kind, {}, f"no action registry for kind {sc.kind!r}: {exc!r}"

    # --- plans ------------------------------------------------------------------------

    async def _on_plan(self, plan: Plan, redelivered: bool) -> list[Event]:
        if not plan.steps:
            return []  # a plan that follows another incident's remediation: nothing to run
        # The plan's record and the policy state in one round trip.
        (prog, rev), reads = await asyncio.gather(self._progress(plan.plan_id),
                                                  self._policy_reads())
        if prog is not None:
            if prog.plan.id != plan.id:
                log.warning("plan id seen before; ignoring the copy",
                            extra={"plan_id": plan.plan_id})
                return []
            return _recorded(prog)  # a redelivery: re-emit, dedup drops what landed
        prog = PlanProgress(plan=plan, steps={
            s.step_id: StepState(execution_id=execution_id_for(plan.plan_id, s.step_id))
            for s in plan.steps})
        kind, actions, why_none = self._actions(plan.subject)
        out = self._judge_whole(prog, kind, actions, why_none)
        out += await self._advance(prog, plan.id, kind, actions, reads)
        await self._save_progress(prog, rev)
        await self._reached("plan_committed")
        return out

    def _judge_whole(self, prog: PlanProgress, kind: str, actions: dict[str, ActionSpec],
                     why_none: str) -> list[Event]:
        """Before the first step: a plan that cannot run in full does not start. Each
        step that could never run is vetoed with its own rule, and every other step with
        rule `plan`, naming the first of them."""
        plan = prog.plan
        problems: dict[str, tuple[str, str]] = {}
        for sid, why in policy.dag_problems(plan.steps).items():
            problems[sid] = ("dag", why)
        disruptive = {s.step_id: policy.is_disruptive(s, actions) for s in plan.steps}
        for sid, found in waves.structure_problems(plan.steps, disruptive).items():
            problems.setdefault(sid, found)
        for step in plan.steps:
            static = ("registry", why_none) if why_none else policy.static_problem(
                step, subject=plan.subject, kind=kind, actions=actions, cfg=self.cfg)
            if static is not None:
                problems.setdefault(step.step_id, static)
        if not problems:
            return []
        first = next(s.step_id for s in plan.steps if s.step_id in problems)
        rule, _ = problems[first]
        out: list[Event] = []
        for step in plan.steps:
            if step.step_id in problems:
                r, why = problems[step.step_id]
                out.append(self._set(prog, step, "vetoed", why, plan.id, rule=r))
            else:
                why = (f"not started: the plan cannot run in full (step {first!r} was "
                       f"vetoed: {rule})")
                out.append(self._set(prog, step, "vetoed", why, plan.id, rule="plan"))
        return out

    def _parallel(self, plan: Plan) -> int:
        """How many of this plan's steps may be released (or wait for a human) at once."""
        cap = min(self.cfg.max_parallel_steps, self.cfg.max_concurrent)
        return min(plan.max_parallel, cap) if plan.max_parallel > 0 else cap

    def _held(self, prog: PlanProgress, step: PlanStep, actions: dict[str, ActionSpec]) -> bool:
        """Does this step wait for one of its own plan's (no Decision: it is not refused)?
        The plan's parallel cap is full, or it is disruptive and the plan already has as
        many disruptive steps out as the blast radius allows: steps of one plan take their
        turn (defragment m1, then m2, then m3); another plan's are a veto in judge."""
        own = [st for st in prog.steps.values() if st.status in IN_FLIGHT]
        if len(own) >= self._parallel(prog.plan):
            return True
        if not policy.is_disruptive(step, actions):
            return False
        own_out = sum(1 for st in own if st.disruptive)
        return 0 < own_out and own_out >= self.cfg.max_disruptive_per_subject

    async def _advance(self, prog: PlanProgress, cause_id: str, kind: str,
                       actions: dict[str, ActionSpec],
                       reads: PolicyReads | None = None) -> list[Event]:
        """Decide every step that became decidable, until nothing changes; then the
        plan's own events (a wave started or finished, the plan ended). `reads`: the
        policy state read fresh by the caller for this message, else read here."""
        plan = prog.plan
        mode, kill, usage, urev = reads or await self._policy_reads()
        now = time.time()
        usage = policy.prune(usage, now, keep_s=max(self.cfg.action_cooldown_s, 0.0))
        touched = False
        out: list[Event] = []
        by_id = {s.step_id: s for s in plan.steps}
        while True:
            status = {sid: st.status for sid, st in prog.steps.items()}
            doomed = waves.doomed(plan.steps, status)
            for sid, reason in doomed.items():
                out.append(self._set(prog, by_id[sid], "skipped", reason, cause_id,
                                     rule="dependency"))
            changed = bool(doomed)
            for step in waves.startable(plan.steps, status):
                if prog.revoked or step.step_id in doomed or self._held(prog, step, actions):
                    continue
                changed = True
                eid = prog.steps[step.step_id].execution_id
                j = policy.judge(step, subject=plan.subject, kind=kind, actions=actions,
                                 cfg=self.cfg, mode=mode, kill_engaged=kill, usage=usage,
                                 now=now, execution_id=eid, plan_id=plan.plan_id)
                prog.steps[step.step_id].disruptive = j.step.disruptive
                if j.outcome == "approve":
                    approved, usage = self._approve(prog, j.step, cause_id, "policy", usage, now)
                    out.append(approved)
                    touched = True
                elif j.outcome == "await_human":
                    out.append(await self._await_human(prog, j.step, j.reason, cause_id, now,
                                                       j.rule))
                else:
                    out.append(self._set(prog, j.step, "vetoed", j.reason, cause_id,
                                         rule=j.rule))
            if not changed:
                break
        if touched:
            await self._save_usage(usage, urev)
        return out + self._plan_events(prog, cause_id, now)

    def _plan_events(self, prog: PlanProgress, cause_id: str, now: float) -> list[Event]:
        """Wave N of M started (its first step released) or finished (every step of a
        started wave ended), and the plan's end once every step ended. Recorded in the
        progress, so a redelivery re-emits them under the same ids."""
        plan = prog.plan
        wave = waves.wave_of(plan.steps)
        total = max(wave.values(), default=0)
        out: list[PlanProgressed | PlanEnded] = []

        def progressed(n: int, state: Literal["started", "finished"], ids: list[str],
                       detail: str = "") -> PlanProgressed:
            return PlanProgressed(id=derive_id("wave", plan.plan_id, n, state),
                                  incident_id=plan.incident_id, causation_id=cause_id,
                                  subject=plan.subject, plan_id=plan.plan_id, wave=n,
                                  waves=total, state=state, steps=ids, detail=detail)

        for n in range(1, total + 1):
            ids = [s.step_id for s in plan.steps if wave[s.step_id] == n]
            states = [prog.steps[i] for i in ids]
            if n not in prog.waves_started and any(st.released for st in states):
                prog.waves_started.append(n)
                out.append(progressed(n, "started", ids))
            if n in prog.waves_started and n not in prog.waves_finished and all(
                    st.status in ENDED for st in states):
                prog.waves_finished.append(n)
                detail = "; ".join(
                    f"{s.step_id} {s.action}: {prog.steps[s.step_id].ended}"
                    for s in plan.steps if wave[s.step_id] == n)
                out.append(progressed(n, "finished", ids, detail))
        ended = all(st.status in ENDED for st in prog.steps.values())
        if ended and not any(isinstance(e, PlanEnded) for e in prog.events):
            out.append(_plan_ended(prog, cause_id, now))
        prog.events.extend(out)
        return list(out)

    def _approve(self, prog: PlanProgress, step: PlanStep, cause_id: str, by: str,
                 usage: policy.Usage, now: float) -> tuple[ExecutionApproved, policy.Usage]:
        plan = prog.plan
        st = prog.steps[step.step_id]
        approved = ExecutionApproved(
            id=derive_id("approved", st.execution_id), incident_id=plan.incident_id,
            causation_id=cause_id, subject=plan.subject, execution_id=st.execution_id,
            plan_id=plan.plan_id, step=step, approved_by=by,
            not_after=now + self.cfg.approval_ttl_s)
        runs_s = max(step.timeout_s, step.budget_s)  # every try, with its backoff
        slot = policy.Slot(subject=plan.subject, action=step.action, plan_id=plan.plan_id,
                           incident_id=plan.incident_id, disruptive=step.disruptive,
                           until=approved.not_after + runs_s + self.cfg.slot_grace_s)
        usage = policy.record_release(usage, st.execution_id, step, plan.subject, now, slot)
        st.status = "approved"
        st.detail = f"approved by {by}"
        st.released = True
        st.disruptive = step.disruptive
        st.events.append(approved)
        log.info("approved", extra={"execution_id": st.execution_id, "action": step.action,
                                    "by": by})
        return approved, usage

    async def _await_human(self, prog: PlanProgress, step: PlanStep, reason: str,
                           cause_id: str, now: float, rule: str) -> Decision:
        st = prog.steps[step.step_id]
        pending = Pending(execution_id=st.execution_id, plan_id=prog.plan.plan_id,
                          step_id=step.step_id, subject=prog.plan.subject, requested_at=now,
                          expires_at=now + self.cfg.approval_timeout_s,
                          incident_id=prog.plan.incident_id, action=step.action,
                          reason=reason)
        await self.pendings.put(PENDING_PREFIX + st.execution_id, pending)
        self.pending[st.execution_id] = pending
        self.m_pending.set(len(self.pending))
        why = f"{reason}: menders approve {st.execution_id}"
        return self._set(prog, step, "awaiting_approval", why, cause_id, rule=rule)

    def _set(self, prog: PlanProgress, step: PlanStep, status: StepStatus, reason: str,
             cause_id: str, *, rule: str) -> Decision:
        outcome = cast(DecisionOutcome, status)  # only called with Decision outcomes
        st = prog.steps[step.step_id]
        st.status = status
        st.detail = reason
        if status != "awaiting_approval":
            st.ended, st.rule, st.ended_at = status, rule, time.time()
        # Every outcome here but a wait is the end of a step that was never released.
        d = _decision(prog.plan, st.execution_id, step, outcome, reason, cause_id,
                      ends_step=status != "awaiting_approval", rule=rule)
        st.events.append(d)
        log.info("decision", extra={"execution_id": st.execution_id, "outcome": outcome,
                                    "reason": reason})
        return d

    # --- results, approvals -------------------------------------------------------------

    async def _on_result(self, result: ExecutionResult, redelivered: bool) -> list[Event]:
        usage, urev = await self._usage()
        if result.execution_id in usage.in_flight:
            await self._save_usage(policy.free_slot(usage, result.execution_id), urev)
        await self._forget_revocation(result.execution_id)  # the execution ended
        prog, rev = await self._progress(result.plan_id)
        if prog is None:
            return []
        sid = next((s for s, st in prog.steps.items()
                    if st.execution_id == result.execution_id), None)
        if sid is None:
            return []
        st = prog.steps[sid]
        if st.status != "approved":  # already settled: a redelivered or repeated result
            return _recorded(prog) if redelivered else []
        st.status = "succeeded" if result.status == "succeeded" else "failed"
        st.detail = result.detail[:500]  # how it ended is st.ended
        st.ended, st.rule, st.ended_at = result.status, result.rule, time.time()
        st.started_at, st.finished_at = result.started_at, result.finished_at
        kind, actions, _ = self._actions(prog.plan.subject)
        out = await self._advance(prog, result.id, kind, actions)
        await self._save_progress(prog, rev)
        return out

    async def _on_approval(self, ap: HumanApproval, redelivered: bool) -> list[Event]:
        got = await self.pendings.get(PENDING_PREFIX + ap.execution_id)
        if got is not None and got.value.settled_at:
            # Settled already. A redelivery (we may have crashed before the runtime
            # published) re-emits what was recorded; a second click emits nothing.
            return await self._recorded_for(got.value) if redelivered else []
        if got is None:
            log.warning("no execution awaits this approval (decided or unknown)",
                        extra={"execution_id": ap.execution_id, "by": ap.by})
            return []
        out = await self._settle(got.value, ap.id, ap.approved, ap.by, ap.reason)
        await self._reached("approval_committed")
        return out

    async def _pending(self, execution_id: str) -> Pending | None:
        """The step waiting for a human under this id (None if none or settled)."""
        got = await self.pendings.get(PENDING_PREFIX + execution_id)
        return None if got is None or got.value.settled_at else got.value

    async def _settle(self, pending: Pending, cause_id: str, approved: bool, by: str,
                      reason: str, outcome: StepStatus = "denied",
                      rule: str = "") -> list[Event]:
        """A waiting step's end: released by a human, or denied/revoked/timed out.

        The events are recorded in the plan's progress and the pending key is kept,
        marked settled, until they surely went out (see _expire_loop)."""
        prog, rev = await self._progress(pending.plan_id)
        out: list[Event] = []
        if prog is not None and prog.steps[pending.step_id].status == "awaiting_approval":
            step = next(s for s in prog.plan.steps if s.step_id == pending.step_id)
            kind, actions, why_none = self._actions(prog.plan.subject)
            if not approved:
                why = f"{outcome} by {by}" + (f": {reason}" if reason else "")
                out.append(self._set(prog, step, outcome, why, cause_id,
                                     rule=rule or outcome))
            elif why_none:
                out.append(self._set(prog, step, "vetoed", why_none, cause_id,
                                     rule="registry"))
            else:
                out += await self._release(prog, step, cause_id, by, kind, actions)
            out += await self._advance(prog, cause_id, kind, actions)
            await self._save_progress(prog, rev)
            await self._reached("settle_progress_saved")
        elif prog is not None:
            # Decided, but the pending was never marked: a governor died in between.
            # What it decided is recorded; emit that again rather than nothing.
            out = await self._recorded_for(pending)
        settled = msgspec.structs.replace(pending, settled_at=time.time())
        await self.pendings.put(PENDING_PREFIX + pending.execution_id, settled)
        self.pending.pop(pending.execution_id, None)
        self.settled[pending.execution_id] = settled
        self.m_pending.set(len(self.pending))
        return out

    async def _recorded_for(self, pending: Pending) -> list[Event]:
        """What settling `pending` published: its step's events, the plan's Decisions
        (dependents skipped with it) and its own events, never another step's approval."""
        prog, _ = await self._progress(pending.plan_id)
        if prog is None:
            return []
        mine = prog.steps[pending.step_id].events if pending.step_id in prog.steps else []
        others = [e for sid, st in prog.steps.items() if sid != pending.step_id
                  for e in st.events if isinstance(e, Decision)]
        return [*mine, *others, *prog.events]

    async def _release(self, prog: PlanProgress, step: PlanStep, cause_id: str, by: str,
                       kind: str, actions: dict[str, ActionSpec]) -> list[Event]:
        """A human approved: policy still applies (kill, observe, registry, limits)."""
        mode, kill = await self._read_policy_state()
        usage, urev = await self._usage()
        now = time.time()
        eid = prog.steps[step.step_id].execution_id
        j = policy.judge(step, subject=prog.plan.subject, kind=kind, actions=actions,
                         cfg=self.cfg, mode=mode, kill_engaged=kill, usage=usage, now=now,
                         execution_id=eid, human_approved=True)
        if j.outcome != "approve":
            return [self._set(prog, j.step, "vetoed", f"approved by {by}, but {j.reason}",
                              cause_id, rule=j.rule)]
        approved, usage = self._approve(prog, j.step, cause_id, by, usage, now)
        await self._save_usage(usage, urev)
        return [approved]

    async def _expire_loop(self) -> None:
        """Approval timeouts, expired slots, and forgetting what no longer matters.

        Publish-safe: each settlement is committed with a marker (a settled pending,
        a slot still in flight) that is removed only after its events were published,
        so a crash in between re-publishes them (same ids: dedup drops copies) when a
        governor starts again."""
        for p in list(self.settled.values()):  # settled by a governor that then died
            async with self.lock:
                out = await self._recorded_for(p)
            await self._publish_all(out)
            await self._forget_pending(p.execution_id)
        while True:
            await asyncio.sleep(TICK_S)
            now = time.time()
            await self._expire_approvals(now)
            await self._expire_slots(now)
            for p in [p for p in self.settled.values() if p.settled_at + SETTLED_KEEP_S < now]:
                await self._forget_pending(p.execution_id)
            if now >= self.next_purge:
                self.next_purge = now + self.purge_every_s
                await self._purge(now)

    async def _publish_all(self, events: Sequence[Event]) -> None:
        for e in events:
            await self.rt.publish(e)
        self._count(events)

    async def _forget_pending(self, execution_id: str) -> None:
        async with self.lock:
            await self.kv.delete(PENDING_PREFIX + execution_id)
            self.settled.pop(execution_id, None)

    async def _expire_approvals(self, now: float) -> None:
        """Deny what waited longer than approval_timeout_s for a human."""
        for p in [p for p in self.pending.values() if p.expires_at <= now]:
            async with self.lock:
                current = await self._pending(p.execution_id)
                if current is None:
                    self.pending.pop(p.execution_id, None)
                    continue
                out = await self._settle(current, derive_id("expiry", p.execution_id),
                                         False, "the governor",
                                         f"no human decision within "
                                         f"{self.cfg.approval_timeout_s:g}s",
                                         rule="approval_timeout")
            await self._reached("expiry_committed")
            await self._publish_all(out)
            await self._forget_pending(p.execution_id)

    async def _expire_slots(self, now: float) -> None:
        """A released step that no executor reported on before its slot ran out ends here:
        an `expired` Decision (ends_step), the step failed, its dependents vetoed."""
        usage, _ = await self._usage()
        for eid, slot in [(k, s) for k, s in usage.in_flight.items() if s.until <= now]:
            async with self.lock:
                out = await self._expire_step(eid, slot)
            await self._reached("slot_expiry_committed")
            await self._publish_all(out)
            async with self.lock:
                usage, urev = await self._usage()
                if eid in usage.in_flight:
                    await self._save_usage(policy.free_slot(usage, eid), urev)
                await self._forget_revocation(eid)

    async def _expire_step(self, eid: str, slot: policy.Slot) -> list[Event]:
        prog, rev = await self._progress(slot.plan_id)
        if prog is None:
            return []
        sid = next((s for s, st in prog.steps.items() if st.execution_id == eid), None)
        if sid is None:
            return []
        st = prog.steps[sid]
        if st.status != "approved":  # ended already, or expired by a governor that died
            return [e for x in prog.steps.values() for e in x.events
                    if isinstance(e, Decision) and e.ends_step]
        step = next(s for s in prog.plan.steps if s.step_id == sid)
        why = (f"released, but no executor reported on it before {time.ctime(slot.until)} "
               f"(approval expired, step timeout and grace passed)")
        st.status = "failed"
        st.detail = f"expired: {why}"
        st.ended, st.rule, st.ended_at = "expired", "expired", time.time()
        d = _decision(prog.plan, eid, step, "expired", why, derive_id("expired", eid),
                      ends_step=True, rule="expired")
        raw = await self.kv.get_bytes(revoked_key(eid))
        if raw is not None:  # the key's existence alone revokes
            # Revoked after release, and nobody ran it: it ends as the human's "no", so
            # the planner does not try the same action again. Its own id: the earlier
            # `revoked` Decision (which did not end the step) holds the plain one.
            rv = parse_revocation(raw)
            why = ((f"revoked by {rv.by}" + (f": {rv.reason}" if rv.reason else "")
                    if rv is not None else "revoked") + "; no executor ran it")
            d = msgspec.structs.replace(d, id=derive_id("expired", eid, "revoked"),
                                        outcome="revoked", reason=why, rule="revoked")
            st.ended, st.rule = "revoked", "revoked"
        st.events.append(d)
        log.warning("released execution expired unreported", extra={"execution_id": eid})
        kind, actions, _ = self._actions(prog.plan.subject)
        out: list[Event] = [d, *await self._advance(prog, d.id, kind, actions)]
        await self._save_progress(prog, rev)
        return out

    async def _forget_revocation(self, execution_id: str) -> None:
        """The execution ended or can no longer start: its revocation can go (checked
        first, so a delete marker is written only for a key that exists)."""
        if await self.kv.get_bytes(revoked_key(execution_id)) is not None:
            await self.kv.delete(revoked_key(execution_id))

    async def _purge(self, now: float) -> None:
        """Bound the bucket: finished plans after PLAN_KEEP_S, stale revocations."""
        for key in await self.kv.keys(PLAN_PREFIX):
            async with self.lock:
                try:
                    got = await self.plans.get(key)
                except msgspec.DecodeError:
                    continue  # not ours to judge: leave it for a human
                if got is not None and got.value.ended_at \
                        and got.value.ended_at + self.plan_keep_s < now:
                    await self.kv.delete(key)
        for key in await self.kv.keys(REVOKED_PREFIX):
            raw = await self.kv.get_bytes(key)
            rev = parse_revocation(raw) if raw is not None else None
            if rev is not None and rev.at + REVOKED_KEEP_S < now:
                await self.kv.delete(key)

    # --- control ------------------------------------------------------------------------

    async def _on_control(self, cmd: ControlCommand, redelivered: bool) -> list[Event]:
        log.info("control", extra={"command": cmd.command, "by": cmd.by, "reason": cmd.reason,
                                   "mode": cmd.mode, "execution_id": cmd.execution_id})
        if cmd.command == "mode":
            if cmd.mode is None:
                raise Reject("mode command without a mode")
            await self.kv.put(MODE_KEY, encode_mode(cmd.mode))
            return [_policy_changed(cmd)]
        if cmd.command == "kill":
            flag = parse_kill(await self.kv.get_bytes(KILL_KEY))
            written = flag.engaged and flag.reason not in (UNREADABLE_KILL, MISSING_KILL)
            if not written:  # the operator usually wrote it already: keep its `at`
                # Released, missing or unreadable: write a readable engaged flag.
                flag = KillFlag(engaged=True, by=cmd.by, reason=cmd.reason, at=cmd.ts)
                await self.kv.put(KILL_KEY, encode_kill(flag))
            self.m_kill.set(1)
            return await self._kill_decisions(flag)
        if cmd.command == "resume":
            # Readers take the flag as released only at the revision recorded (kill_state).
            await killswitch.release(self.kv, cmd.by, cmd.reason)
            self.m_kill.set(0)
            return [_policy_changed(cmd)]
        return await self._revoke(cmd, redelivered)

    async def _revoke(self, cmd: ControlCommand, redelivered: bool) -> list[Event]:
        if cmd.plan_id:
            return await self._revoke_plan(cmd, redelivered)
        eid = cmd.execution_id
        if not eid:
            raise Reject("revoke command without an execution_id or a plan_id")
        # Written first, whatever follows: executors refuse it, `menders revoke` sees it.
        rev = Revocation(execution_id=eid, by=cmd.by, reason=cmd.reason, at=cmd.ts)
        await self.kv.put(revoked_key(eid), encode_revocation(rev))
        why = f"revoked by {cmd.by}" + (f": {cmd.reason}" if cmd.reason else "")
        got = await self.pendings.get(PENDING_PREFIX + eid)
        if got is not None and got.value.settled_at:
            return await self._recorded_for(got.value) if redelivered else []
        if got is not None:  # never released: it ends here, and no executor will see it
            return await self._settle(got.value, cmd.id, False, cmd.by, cmd.reason,
                                      "revoked")
        usage, _ = await self._usage()
        slot = usage.in_flight.get(eid)
        if slot is None:
            log.warning("revocation recorded for an execution not in flight",
                        extra={"execution_id": eid})
            return []
        return [Decision(id=derive_id("decision", eid, "revoked"), incident_id=slot.incident_id,
                         causation_id=cmd.id, subject=slot.subject, outcome="revoked",
                         reason=why, rule="revoked", plan_id=slot.plan_id, execution_id=eid)]

    async def _revoke_plan(self, cmd: ControlCommand, redelivered: bool) -> list[Event]:
        """A whole plan: its running steps revoked (their executors cancel them), its
        waiting steps ended `revoked`, its steps awaiting a human settled `revoked`; no
        step of it starts any more, and its PlanEnded follows as usual."""
        why = f"plan revoked by {cmd.by}" + (f": {cmd.reason}" if cmd.reason else "")
        await self.kv.put(plan_revoked_key(cmd.plan_id), encode_revocation(Revocation(
            execution_id=cmd.plan_id, by=cmd.by, reason=cmd.reason, at=cmd.ts)))
        prog, rev = await self._progress(cmd.plan_id)
        if prog is None:
            log.warning("revocation recorded for a plan the governor does not know",
                        extra={"plan_id": cmd.plan_id})
            return []
        out: list[Event] = []
        if prog.revoked:  # a redelivery: re-emit, and settle what a crash left waiting
            return [*(_recorded(prog) if redelivered else []),
                    *await self._settle_waiting(prog, cmd)]
        prog.revoked = why
        for step in prog.plan.steps:
            st = prog.steps[step.step_id]
            if st.status == "waiting":
                out.append(self._set(prog, step, "revoked", why, cmd.id, rule="revoked"))
            elif st.status == "approved":
                # Written first: executors refuse or cancel it. Its end is its result.
                await self.kv.put(revoked_key(st.execution_id), encode_revocation(Revocation(
                    execution_id=st.execution_id, by=cmd.by, reason=cmd.reason, at=cmd.ts)))
                d = _decision(prog.plan, st.execution_id, step, "revoked", why, cmd.id,
                              ends_step=False, rule="revoked")
                st.events.append(d)
                out.append(d)
        out += self._plan_events(prog, cmd.id, time.time())
        await self._save_progress(prog, rev)
        return out + await self._settle_waiting(prog, cmd)

    async def _settle_waiting(self, prog: PlanProgress, cmd: ControlCommand) -> list[Event]:
        """A revoked plan's steps still awaiting a human end `revoked`; each settle loads
        and saves the plan's progress itself."""
        out: list[Event] = []
        for st in list(prog.steps.values()):
            pending = self.pending.get(st.execution_id)
            if pending is not None and st.status == "awaiting_approval":
                out += await self._settle(pending, cmd.id, False, cmd.by, cmd.reason, "revoked")
        return out

    async def _kill_decisions(self, flag: KillFlag) -> list[Event]:
        """One `killed` Decision per execution in flight, so each plan hears of it."""
        usage, _ = await self._usage()
        now = time.time()
        why = f"kill switch engaged by {flag.by}" + (f": {flag.reason}" if flag.reason else "")
        return [Decision(id=derive_id("killed", eid, flag.at), incident_id=s.incident_id,
                         subject=s.subject, outcome="killed", reason=why, rule="kill",
                         plan_id=s.plan_id,
                         execution_id=eid)
                for eid, s in usage.in_flight.items() if s.until > now]

    async def _watch_kill(self) -> None:
        """The operator writes the kill flag directly: react without waiting for its
        command. A release that no resume of ours made (a put of a released flag, a
        deleted key) is undone here and reported."""

        async def on_kill(_key: str, value: bytes | None) -> None:
            async with self.lock:  # our own resume writes flag and release under it
                flag = await self._kill()  # the one rule every reader uses
                out: list[Event] = []
                if flag.reason in (FORGED_RELEASE, MISSING_KILL):
                    out.append(await self._reengage(flag))
                    flag = await self._kill()
                self.m_kill.set(1 if flag.engaged else 0)
                if flag.engaged:
                    out += await self._kill_decisions(flag)
            await self._publish_all(out)

        await watch_forever(self.rt.nc, self.kv, KILL_KEY, on_kill)

    async def _reengage(self, found: KillFlag) -> KillReengaged:
        entry = await self.kv.get_entry(KILL_KEY)
        was = (f"released by {found.by or 'unknown'} without `menders resume`"
               if entry is not None else "deleted")
        why = f"the kill switch was {was}; engaged again: only `menders resume` releases it"
        now = time.time()
        await self.kv.put(KILL_KEY, encode_kill(KillFlag(engaged=True, by="governor",
                                                         reason=why, at=now)))
        log.warning("kill switch release undone", extra={"reason": why})
        revision = entry[1] if entry is not None else 0
        return KillReengaged(id=derive_id("reengaged", revision, now), reason=why,
                             found_by=found.by if entry is not None else "",
                             found_revision=revision)


def _decision(plan: Plan, execution_id: str, step: PlanStep, outcome: DecisionOutcome,
              reason: str, cause_id: str, ends_step: bool, rule: str) -> Decision:
    return Decision(id=derive_id("decision", execution_id, outcome), incident_id=plan.incident_id,
                    causation_id=cause_id, subject=plan.subject, outcome=outcome, reason=reason,
                    plan_id=plan.plan_id, execution_id=execution_id, step=step,
                    ends_step=ends_step, rule=rule)


def _policy_changed(cmd: ControlCommand) -> PolicyChanged:
    """What was held back (parked by the planner) may be planned again."""
    change: Literal["resume", "mode"] = "mode" if cmd.command == "mode" else "resume"
    return PolicyChanged(id=derive_id("policy", cmd.id), causation_id=cmd.id, change=change,
                         mode=cmd.mode, by=cmd.by, reason=cmd.reason)


def _recorded(prog: PlanProgress) -> list[Event]:
    return [*(e for st in prog.steps.values() for e in st.events), *prog.events]


def _plan_ended(prog: PlanProgress, cause_id: str, now: float) -> PlanEnded:
    """How the plan ended: `succeeded` if every step but fire-and-forget ones did,
    `failed` if a released one did not, else `blocked`. The deciding step is the first
    to end without success that was not merely skipped behind another."""
    plan = prog.plan
    endings = [StepEnding(step_id=s.step_id, action=s.action, params=s.params, mode=s.mode,
                          ended=prog.steps[s.step_id].ended or prog.steps[s.step_id].status,
                          rule=prog.steps[s.step_id].rule,
                          detail=prog.steps[s.step_id].detail[:300],
                          released=prog.steps[s.step_id].released)
               for s in plan.steps]
    counted = [(e, prog.steps[e.step_id]) for e in endings if e.mode != "fire_and_forget"]
    bad = sorted(((e, st) for e, st in counted if st.status != "succeeded"),
                 key=lambda x: (x[1].status == "skipped", x[1].ended_at))
    outcome: Literal["succeeded", "failed", "blocked"] = (
        "succeeded" if not bad else
        "failed" if any(st.released for _, st in bad) else "blocked")
    if outcome == "failed":  # the released step that failed decides, not a veto beside it
        bad.sort(key=lambda x: (not x[1].released, x[1].status == "skipped", x[1].ended_at))
    started = [st.started_at for st in prog.steps.values() if st.started_at]
    finished = [st.finished_at for st in prog.steps.values() if st.finished_at]
    return PlanEnded(id=derive_id("plan-ended", plan.plan_id), incident_id=plan.incident_id,
                     causation_id=cause_id, subject=plan.subject, plan_id=plan.plan_id,
                     outcome=outcome, steps=endings, deciding=bad[0][0] if bad else None,
                     started_at=min(started, default=0.0),
                     finished_at=max(finished, default=0.0) or now)


ACTOR = Governor
