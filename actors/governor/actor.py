"""The safety governor: the only actor that may approve an execution.

It judges every plan step against policy (actors/governor/policy.py, pure) and keeps
everything it must remember in its KV bucket, so a restarted governor
honours the same mode, kill switch, approvals and rate windows:

  mode, kill, revoked.<id>   shared with the operator and executors (bus_schemas.governor)
  limits                      rate windows, in-flight slots, cooldowns (policy.Usage)
  plan.<hash of plan_id>      each plan's progress: every step's status and the
                              events published for it (PlanProgress)
  pending.<execution_id>      a step waiting for `menders approve|deny`

Each handler reads state, decides, writes state (compare-and-swap), then
returns its events; their ids are derived from the execution id, so a
redelivered message (after a crash between write and publish) re-emits the
recorded events and JetStream dedup drops copies that had landed.

Fail closed: an unreadable kill flag counts as engaged, a missing mode as
observe, an unknown subject or an unloadable registry vetoes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, cast

import msgspec

import subjects
from actors.governor import policy
from actors.runtime import Actor, Delivery, Reject, derive_id
from actors.runtime.killswitch import read_kill
from actors.runtime.kv import Bucket, Records, watch_forever
from actors.runtime.logs import get_logger
from bus_schemas import catalog
from bus_schemas.governor import (
    KILL_KEY,
    MODE_KEY,
    RELEASE_KEY,
    KillFlag,
    Release,
    Revocation,
    encode_kill,
    encode_mode,
    encode_release,
    encode_revocation,
    parse_kill,
    parse_mode,
    revoked_key,
)
from bus_schemas.messages import (
    ControlCommand,
    Decision,
    DecisionOutcome,
    Event,
    ExecutionApproved,
    ExecutionResult,
    HumanApproval,
    Mode,
    Plan,
    PlanStep,
)
from subjects.base import ActionSpec

log = get_logger("menders.governor")

LIMITS_KEY = "limits"
PLAN_PREFIX = "plan."
PENDING_PREFIX = "pending."
SLOT_GRACE_S = 30.0  # after not_after + timeout, no executor can still be acting

StepStatus = Literal[
    "waiting", "awaiting_approval", "approved", "succeeded", "failed", "vetoed", "denied",
    "revoked",
]
NOT_SUCCEEDED = ("failed", "vetoed", "denied", "revoked")


class StepState(msgspec.Struct, kw_only=True):
    execution_id: str
    status: StepStatus = "waiting"
    detail: str = ""
    events: list[ExecutionApproved | Decision] = []  # what was published for this step


class PlanProgress(msgspec.Struct, kw_only=True):
    plan: Plan
    steps: dict[str, StepState]


class Pending(msgspec.Struct, kw_only=True):
    execution_id: str
    plan_id: str
    step_id: str
    subject: str
    requested_at: float
    expires_at: float


def execution_id_for(plan_id: str, step_id: str) -> str:
    """Deterministic: the same plan step always gets the same execution id."""
    return derive_id("exec", plan_id, step_id)


def plan_key(plan_id: str) -> str:
    return PLAN_PREFIX + derive_id("plan", plan_id)  # plan ids may hold non-key characters


class Governor(Actor):
    name = "governor"

    async def setup(self) -> None:
        assert self.rt.js is not None
        self.cfg = self.config.governor
        self.kv = Bucket(await self.rt.js.key_value(catalog.GOVERNOR_BUCKET))
        self.limits = Records(self.kv, policy.Usage)
        self.plans = Records(self.kv, PlanProgress)
        self.pendings = Records(self.kv, Pending)
        self.lock = asyncio.Lock()  # the consumer and the expiry loop share state
        await self.kv.create_bytes(MODE_KEY, encode_mode(self.cfg.mode))  # kept if it exists
        self.pending: dict[str, Pending] = {}
        for key in await self.kv.keys(PENDING_PREFIX):
            got = await self.pendings.get(key)
            if got is not None:
                self.pending[got.value.execution_id] = got.value
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
        return (self._expire_loop, self._watch_kill)

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        async with self.lock:
            if isinstance(event, Plan):
                out = await self._on_plan(event, delivery.redelivered)
            elif isinstance(event, ExecutionResult):
                out = await self._on_result(event, delivery.redelivered)
            elif isinstance(event, HumanApproval):
                out = await self._on_approval(event)
            elif isinstance(event, ControlCommand):
                out = await self._on_control(event)
            else:
                raise Reject(f"the governor does not handle {type(event).__name__}")
        for e in out:
            self.m_decisions.labels(outcome=e.outcome if isinstance(e, Decision)
                                    else "approved").inc()
        return out

    # --- state ------------------------------------------------------------------------

    async def _mode(self) -> Mode | None:
        return parse_mode(await self.kv.get_bytes(MODE_KEY))

    async def _kill(self) -> KillFlag:
        return await read_kill(self.kv)

    async def _read_policy_state(self) -> tuple[Mode, bool]:
        mode = await self._mode() or "observe"  # no mode written: fail closed
        return mode, (await self._kill()).engaged

    async def _usage(self) -> tuple[policy.Usage, int]:
        got = await self.limits.get(LIMITS_KEY)
        return (policy.Usage(), 0) if got is None else (got.value, got.revision)

    async def _save_usage(self, usage: policy.Usage, rev: int) -> None:
        """CAS write: a conflict raises, the message is nak'ed and judged again."""
        await self.limits.save(LIMITS_KEY, usage, rev or None)

    async def _save_progress(self, prog: PlanProgress, rev: int) -> None:
        """CAS write, like _save_usage."""
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
            return sc.kind, subjects.load(sc.kind).actions, ""
        except Exception as exc:  # an unloadable registry vetoes everything: fail closed
            return sc.kind, {}, f"no action registry for kind {sc.kind!r}: {exc!r}"

    # --- plans ------------------------------------------------------------------------

    async def _on_plan(self, plan: Plan, redelivered: bool) -> list[Event]:
        if not plan.steps:
            return []  # a plan that follows another incident's remediation: nothing to run
        prog, rev = await self._progress(plan.plan_id)
        if prog is not None:
            if prog.plan.id != plan.id:
                log.warning("plan id seen before; ignoring the copy",
                            extra={"plan_id": plan.plan_id})
                return []
            return _recorded(prog)  # a redelivery: re-emit, dedup drops what landed
        prog = PlanProgress(plan=plan, steps={
            s.step_id: StepState(execution_id=execution_id_for(plan.plan_id, s.step_id))
            for s in plan.steps})
        out: list[Event] = []
        kind, actions, why_none = self._actions(plan.subject)
        problems = policy.dag_problems(plan.steps)
        for step in plan.steps:
            reason = why_none or problems.get(step.step_id, "")
            if reason:
                out.append(self._set(prog, step, "vetoed", reason, plan.id))
        out += await self._advance(prog, plan.id, kind, actions)
        await self._save_progress(prog, rev)
        return out

    async def _advance(self, prog: PlanProgress, cause_id: str, kind: str,
                       actions: dict[str, ActionSpec]) -> list[Event]:
        """Decide every step that became decidable, until nothing changes."""
        plan = prog.plan
        mode, kill = await self._read_policy_state()
        usage, urev = await self._usage()
        now = time.time()
        usage = policy.prune(usage, now, keep_s=max(self.cfg.action_cooldown_s, 0.0))
        touched = False
        out: list[Event] = []
        while True:
            decided = {sid for sid, st in prog.steps.items() if st.status != "waiting"}
            ended = {sid: st.status for sid, st in prog.steps.items()
                     if st.status in NOT_SUCCEEDED}
            succeeded = {sid for sid, st in prog.steps.items() if st.status == "succeeded"}
            blocked = policy.blocked(plan.steps, ended, decided)
            ready = [s for s in policy.ready(plan.steps, succeeded, decided)
                     if s.step_id not in blocked]
            if not blocked and not ready:
                break
            by_id = {s.step_id: s for s in plan.steps}
            for sid, reason in blocked.items():
                out.append(self._set(prog, by_id[sid], "vetoed", reason, cause_id))
            for step in ready:
                eid = prog.steps[step.step_id].execution_id
                j = policy.judge(step, subject=plan.subject, kind=kind, actions=actions,
                                 cfg=self.cfg, mode=mode, kill_engaged=kill, usage=usage,
                                 now=now, execution_id=eid)
                if j.outcome == "approve":
                    approved, usage = self._approve(prog, j.step, cause_id, "policy", usage, now)
                    out.append(approved)
                    touched = True
                elif j.outcome == "await_human":
                    out.append(await self._await_human(prog, j.step, j.reason, cause_id, now))
                else:
                    out.append(self._set(prog, j.step, "vetoed", j.reason, cause_id))
        if touched:
            await self._save_usage(usage, urev)
        return out

    def _approve(self, prog: PlanProgress, step: PlanStep, cause_id: str, by: str,
                 usage: policy.Usage, now: float) -> tuple[ExecutionApproved, policy.Usage]:
        plan = prog.plan
        st = prog.steps[step.step_id]
        approved = ExecutionApproved(
            id=derive_id("approved", st.execution_id), incident_id=plan.incident_id,
            causation_id=cause_id, subject=plan.subject, execution_id=st.execution_id,
            plan_id=plan.plan_id, step=step, approved_by=by,
            not_after=now + self.cfg.approval_ttl_s)
        slot = policy.Slot(subject=plan.subject, action=step.action, plan_id=plan.plan_id,
                           incident_id=plan.incident_id,
                           until=approved.not_after + step.timeout_s + SLOT_GRACE_S)
        usage = policy.record_release(usage, st.execution_id, step, plan.subject, now, slot)
        st.status = "approved"
        st.detail = f"approved by {by}"
        st.events.append(approved)
        log.info("approved", extra={"execution_id": st.execution_id, "action": step.action,
                                    "by": by})
        return approved, usage

    async def _await_human(self, prog: PlanProgress, step: PlanStep, reason: str,
                           cause_id: str, now: float) -> Decision:
        st = prog.steps[step.step_id]
        pending = Pending(execution_id=st.execution_id, plan_id=prog.plan.plan_id,
                          step_id=step.step_id, subject=prog.plan.subject, requested_at=now,
                          expires_at=now + self.cfg.approval_timeout_s)
        await self.pendings.put(PENDING_PREFIX + st.execution_id, pending)
        self.pending[st.execution_id] = pending
        self.m_pending.set(len(self.pending))
        why = f"{reason}: menders approve {st.execution_id}"
        return self._set(prog, step, "awaiting_approval", why, cause_id)

    def _set(self, prog: PlanProgress, step: PlanStep, status: StepStatus, reason: str,
             cause_id: str) -> Decision:
        outcome = cast(DecisionOutcome, status)  # only called with Decision outcomes
        st = prog.steps[step.step_id]
        st.status = status
        st.detail = reason
        d = _decision(prog.plan, st.execution_id, step, outcome, reason, cause_id)
        st.events.append(d)
        log.info("decision", extra={"execution_id": st.execution_id, "outcome": outcome,
                                    "reason": reason})
        return d

    # --- results, approvals -------------------------------------------------------------

    async def _on_result(self, result: ExecutionResult, redelivered: bool) -> list[Event]:
        usage, urev = await self._usage()
        if result.execution_id in usage.in_flight:
            await self._save_usage(policy.free_slot(usage, result.execution_id), urev)
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
        st.detail = f"{result.status}: {result.detail}"[:500]
        kind, actions, _ = self._actions(prog.plan.subject)
        out = await self._advance(prog, result.id, kind, actions)
        await self._save_progress(prog, rev)
        return out

    async def _on_approval(self, ap: HumanApproval) -> list[Event]:
        pending = await self._pending(ap.execution_id)
        if pending is None:
            log.warning("no execution awaits this approval (decided or unknown)",
                        extra={"execution_id": ap.execution_id, "by": ap.by})
            return []
        return await self._settle(pending, ap.id, ap.approved, ap.by, ap.reason)

    async def _pending(self, execution_id: str) -> Pending | None:
        got = await self.pendings.get(PENDING_PREFIX + execution_id)
        return None if got is None else got.value

    async def _settle(self, pending: Pending, cause_id: str, approved: bool, by: str,
                      reason: str, outcome: StepStatus = "denied") -> list[Event]:
        """A waiting step's end: released by a human, or denied/revoked/timed out."""
        prog, rev = await self._progress(pending.plan_id)
        out: list[Event] = []
        if prog is not None and prog.steps[pending.step_id].status == "awaiting_approval":
            step = next(s for s in prog.plan.steps if s.step_id == pending.step_id)
            kind, actions, why_none = self._actions(prog.plan.subject)
            if not approved:
                why = f"{outcome} by {by}" + (f": {reason}" if reason else "")
                out.append(self._set(prog, step, outcome, why, cause_id))
            elif why_none:
                out.append(self._set(prog, step, "vetoed", why_none, cause_id))
            else:
                out += await self._release(prog, step, cause_id, by, kind, actions)
            out += await self._advance(prog, cause_id, kind, actions)
            await self._save_progress(prog, rev)
        await self.kv.delete(PENDING_PREFIX + pending.execution_id)
        self.pending.pop(pending.execution_id, None)
        self.m_pending.set(len(self.pending))
        return out

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
                              cause_id)]
        approved, usage = self._approve(prog, j.step, cause_id, by, usage, now)
        await self._save_usage(usage, urev)
        return [approved]

    async def _expire_loop(self) -> None:
        """Deny what waited longer than approval_timeout_s for a human."""
        while True:
            await asyncio.sleep(0.5)
            now = time.time()
            for p in [p for p in self.pending.values() if p.expires_at <= now]:
                async with self.lock:
                    current = await self._pending(p.execution_id)
                    if current is None:
                        self.pending.pop(p.execution_id, None)
                        continue
                    out = await self._settle(current, derive_id("expiry", p.execution_id),
                                             False, "the governor",
                                             f"no human decision within "
                                             f"{self.cfg.approval_timeout_s:g}s")
                for e in out:
                    await self.rt.publish(e)

    # --- control ------------------------------------------------------------------------

    async def _on_control(self, cmd: ControlCommand) -> list[Event]:
        log.info("control", extra={"command": cmd.command, "by": cmd.by, "reason": cmd.reason,
                                   "mode": cmd.mode, "execution_id": cmd.execution_id})
        if cmd.command == "mode":
            if cmd.mode is None:
                raise Reject("mode command without a mode")
            await self.kv.put(MODE_KEY, encode_mode(cmd.mode))
            return []
        if cmd.command == "kill":
            flag = await self._kill()
            if not flag.engaged:  # the operator usually wrote it already: keep its `at`
                flag = KillFlag(engaged=True, by=cmd.by, reason=cmd.reason, at=cmd.ts)
                await self.kv.put(KILL_KEY, encode_kill(flag))
            self.m_kill.set(1)
            return await self._kill_decisions(flag)
        if cmd.command == "resume":
            flag = KillFlag(engaged=False, by=cmd.by, reason=cmd.reason, at=time.time())
            rev = await self.kv.put(KILL_KEY, encode_kill(flag))
            # Readers take the flag as released only at this revision (kill_state).
            await self.kv.put(RELEASE_KEY, encode_release(Release(
                revision=rev, by=cmd.by, reason=cmd.reason, at=flag.at)))
            self.m_kill.set(0)
            return []
        return await self._revoke(cmd)

    async def _revoke(self, cmd: ControlCommand) -> list[Event]:
        eid = cmd.execution_id
        if not eid:
            raise Reject("revoke command without an execution_id")
        rev = Revocation(execution_id=eid, by=cmd.by, reason=cmd.reason, at=cmd.ts)
        await self.kv.put(revoked_key(eid), encode_revocation(rev))
        why = f"revoked by {cmd.by}" + (f": {cmd.reason}" if cmd.reason else "")
        pending = await self._pending(eid)
        if pending is not None:  # never released: settle it here
            return await self._settle(pending, cmd.id, False, cmd.by, cmd.reason, "revoked")
        usage, _ = await self._usage()
        slot = usage.in_flight.get(eid)
        if slot is None:
            log.warning("revocation recorded for an execution not in flight",
                        extra={"execution_id": eid})
            return []
        return [Decision(id=derive_id("decision", eid, "revoked"), incident_id=slot.incident_id,
                         causation_id=cmd.id, subject=slot.subject, outcome="revoked",
                         reason=why, plan_id=slot.plan_id, execution_id=eid)]

    async def _kill_decisions(self, flag: KillFlag) -> list[Event]:
        """One `killed` Decision per execution in flight, so each plan hears of it."""
        usage, _ = await self._usage()
        now = time.time()
        why = f"kill switch engaged by {flag.by}" + (f": {flag.reason}" if flag.reason else "")
        return [Decision(id=derive_id("killed", eid, flag.at), incident_id=s.incident_id,
                         subject=s.subject, outcome="killed", reason=why, plan_id=s.plan_id,
                         execution_id=eid)
                for eid, s in usage.in_flight.items() if s.until > now]

    async def _watch_kill(self) -> None:
        """The operator writes the kill flag directly: react without waiting for its command."""

        async def on_kill(_key: str, value: bytes | None) -> None:
            flag = parse_kill(value)  # deleted (None) reads as engaged, as everywhere
            self.m_kill.set(1 if flag.engaged else 0)
            if flag.engaged:
                async with self.lock:
                    out = await self._kill_decisions(flag)
                for e in out:
                    await self.rt.publish(e)

        await watch_forever(self.rt.nc, self.kv, KILL_KEY, on_kill)


def _decision(plan: Plan, execution_id: str, step: PlanStep, outcome: DecisionOutcome,
              reason: str, cause_id: str) -> Decision:
    return Decision(id=derive_id("decision", execution_id, outcome), incident_id=plan.incident_id,
                    causation_id=cause_id, subject=plan.subject, outcome=outcome, reason=reason,
                    plan_id=plan.plan_id, execution_id=execution_id, step=step)


def _recorded(prog: PlanProgress) -> list[Event]:
    return [e for st in prog.steps.values() for e in st.events]


ACTOR = Governor
