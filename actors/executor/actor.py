"""The executor: carries out approved executions, each effect at most once.

It consumes ExecutionApproved only (which only the governor may publish) and,
for each one:

1. Looks in the ledger (actors/executor/ledger.py). A recorded outcome is republished
   (same deterministic id, so dedup drops it) and nothing is done. A claim
   without an outcome is another executor's lease: while it is renewed, we
   wait; once it lapses, the owner is gone: an idempotent step may run again
   (repeating it is harmless by definition), a non-idempotent one is reported
   `unknown` and never repeated.
2. Refuses, with fresh KV `get`s (the watch may lag or have died), when the
   kill switch is not released by the governor, the execution is revoked, the
   approval is past (or has no bounded) not_after, or the mode does not allow
   it: `observe`, or `approve` for a step that only policy approved. A refusal
   is recorded and reported `skipped`.
3. Claims the execution with KV `create()` (a lease it renews while it runs),
   publishes ExecutionStarted, asks the subject's precondition on fresh state
   if the step is disruptive (a refusal is `skipped`, rule `precondition`),
   looks once more, then runs the action through the subject's client: each try
   bounded by the step's timeout, retried as the action's RetryPolicy says
   (failures only, never after a kill), the whole bounded by its budget.
4. A kill or a revocation seen at any moment (KV watch, re-created on
   reconnect, plus a periodic `get` while something runs) cancels it: one seen
   before the action's task exists means it never starts (`skipped`), one seen
   after cancels the task (`cancelled`). Between the last look and the task's
   creation there is no await, so nothing can slip between them.
5. Records the outcome in the ledger, then publishes ExecutionResult.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

import subjects
from actors.executor.admission import Refusal, kill_refusal, refusal, revoke_refusal
from actors.executor.ledger import LeaseWatch, Ledger, LedgerConflict, LedgerEntry, Record
from actors.runtime import Actor, Delivery, Reject, derive_id
from actors.runtime.config import SubjectConfig
from actors.runtime.killswitch import read_kill
from actors.runtime.kv import Bucket, Records, Unreadable, watch_forever
from actors.runtime.logs import get_logger
from actors.runtime.metrics import LATENCY_BUCKETS
from bus_schemas import catalog
from bus_schemas.errors import MendersError
from bus_schemas.governor import (
    KILL_KEY,
    MODE_KEY,
    REVOKED_PREFIX,
    KillFlag,
    parse_kill,
    parse_mode,
    revoked_key,
)
from bus_schemas.messages import (
    Event,
    ExecutionApproved,
    ExecutionResult,
    ExecutionStarted,
    ExecutionStatus,
    PlanStep,
)
from bus_schemas.verifier import IncidentRecord, incident_key
from subjects.base import NO_RETRY, ActionClientProtocol, ActionError, RetryPolicy

log = get_logger("menders.executor")

POLL_S = 0.25  # fallback re-read of the kill flag and revocations while something runs
GRACE_S = 1.0  # the client's own timeout is this much longer than ours
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# The await points between the ledger claim and the action's start, in order: a test
# hook (`Executor._reached`) is called at each, so a race can be made to land in it.
PRESTART = ("claimed", "started_published", "looked")

LOST_LEASE = Refusal("lost_lease", "lost the ledger lease: another executor settled it")


@dataclass
class Running:
    approved: ExecutionApproved
    record: Record
    task: asyncio.Task[str] | None = None
    cancel: Refusal | None = None  # set once, by the first kill, revocation or lost lease
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stop_renewing: asyncio.Event = field(default_factory=asyncio.Event)
    lost_lease: bool = False
    tries: int = 0  # calls of the action so far (its retry policy)


class LostLease(MendersError, RuntimeError):
    """Our lease lapsed and another executor settled the execution: its outcome stands."""


class Executor(Actor):
    name = "executor"

    async def setup(self) -> None:
        assert self.rt.js is not None
        self.gkv = Bucket(await self.rt.js.key_value(catalog.GOVERNOR_BUCKET))
        self.ledger = Ledger(await self.rt.js.key_value(catalog.EXEC_LEDGER_BUCKET))
        self.incidents = Records(await self.rt.js.key_value(catalog.VERIFIER_BUCKET),
                                 IncidentRecord)
        # Unique per process: a restart with the same PID and host is another owner.
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"
        self.lease_s = self.config.executor.lease_s
        self.running: dict[str, Running] = {}
        self.clients: dict[str, ActionClientProtocol] = {}
        m = self.rt.metrics
        self.m_exec = m.counter("menders_executions", "Executions by action and status",
                                ["action", "status"])
        self.m_duration = m.histogram("menders_execution_duration_seconds",
                                      "Time from claim to outcome", ["action"],
                                      buckets=DURATION_BUCKETS)
        self.m_kill = m.histogram("menders_kill_propagation_seconds",
                                  "From the kill flag's `at` to the running action's "
                                  "cancellation", [], buckets=LATENCY_BUCKETS).labels()
        self.m_replayed = m.counter("menders_execution_results_replayed",
                                    "Redeliveries answered from the ledger, without acting",
                                    []).labels()
        self.m_lease_waits = m.counter("menders_execution_lease_waits",
                                       "Redeliveries that waited on another executor's "
                                       "lease, by how the wait ended (settled, expired)",
                                       ["outcome"])

    def background(self) -> Sequence[Callable[[], Awaitable[None]]]:
        return (self._watch_kill, self._watch_revocations, self._poll)

    async def teardown(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()

    async def _reached(self, point: str) -> None:
        """A named await point before the start (PRESTART); tests override it."""

    # --- one approval ---------------------------------------------------------------------

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        if not isinstance(event, ExecutionApproved):
            raise Reject(f"the executor acts on ExecutionApproved only, not {type(event).__name__}")
        eid = event.execution_id
        while eid in self.running:  # redelivered while our own attempt still runs
            await self.running[eid].done.wait()
        # The ledger and the refusal checks in one round trip: the checks are fresh reads
        # either way, and their answer is used only when nobody has claimed the step yet.
        rec, why = await asyncio.gather(self.ledger.read(eid), self._refusal(event))
        if rec is None:
            now = time.time()
            entry = LedgerEntry(execution_id=eid, plan_id=event.plan_id, subject=event.subject,
                                action=event.step.action, idempotent=event.step.idempotent,
                                owner=self.owner, claimed_at=now, lease_s=self.lease_s,
                                renewed_at=now)
            if why is not None:
                result = self._result(event, "skipped", why.reason, now, rule=why.rule)
                entry = msgspec.structs.replace(entry, state="done", result=result)
                if await self.ledger.claim(entry) is not None:
                    return [self._done(result)]
            else:
                claimed = await self.ledger.claim(entry)
                if claimed is not None:
                    await self._reached("claimed")
                    return [await self._execute(event, claimed)]
            rec = await self.ledger.read(eid)  # somebody claimed it between our read and ours
            if rec is None:
                raise RuntimeError(f"ledger entry {eid} vanished")
        return await self._after_claim(event, rec)

    async def _after_claim(self, event: ExecutionApproved, rec: Record) -> list[Event]:
        """A claim exists: answer from the ledger, or wait out its lease and settle it."""
        while True:
            if rec.entry.result is not None:
                self.m_replayed.inc()
                log.info("already done: republishing the recorded result",
                         extra={"execution_id": rec.entry.execution_id,
                                "status": rec.entry.result.status})
                return [rec.entry.result]
            rec = await self._await_lease(rec)
            if rec.entry.result is not None:
                continue
            try:
                return await self._settle_abandoned(event, rec)
            except LedgerConflict:  # the owner renewed or finished just now: look again
                got = await self.ledger.read(event.execution_id)
                if got is None:
                    raise RuntimeError(f"ledger entry {event.execution_id} vanished") from None
                rec = got

    async def _await_lease(self, rec: Record) -> Record:
        """Wait while the claim keeps being renewed; return it once done or lapsed.

        Lapsed means no new revision for the owner's lease_s, timed on our own
        monotonic clock: the owner's timestamps are never compared with ours.
        """
        e = rec.entry
        if e.owner == self.owner and e.execution_id not in self.running:
            return rec  # our own earlier attempt, which failed after its claim: nobody renews it
        watch = LeaseWatch(rec.revision, e.lease_s or self.lease_s, time.monotonic())
        log.warning("waiting on another executor's lease",
                    extra={"execution_id": e.execution_id, "owner": e.owner,
                           "lease_s": watch.lease_s})
        while True:
            await asyncio.sleep(min(watch.lease_s / 4, 0.5))
            now = await self.ledger.read(e.execution_id)
            if now is None:
                raise RuntimeError(f"ledger entry {e.execution_id} vanished")
            if now.entry.result is not None:
                self.m_lease_waits.labels(outcome="settled").inc()
                return now
            if watch.lapsed(now.revision, now.entry.lease_s or self.lease_s, time.monotonic()):
                self.m_lease_waits.labels(outcome="expired").inc()
                log.warning("lease lapsed: its owner is gone",
                            extra={"execution_id": e.execution_id, "owner": now.entry.owner})
                return now

    async def _settle_abandoned(self, event: ExecutionApproved, rec: Record) -> list[Event]:
        """The owner died (or hangs) mid-step: re-run an idempotent step, else `unknown`.

        Every write here is a compare-and-swap on the lapsed revision, so an owner
        that comes back to life and renews first wins (LedgerConflict: look again).
        """
        e = rec.entry
        if e.idempotent:
            why = await self._refusal(event)
            if why is None:
                log.warning("re-running an idempotent step after its executor was lost",
                            extra={"execution_id": e.execution_id, "attempt": e.attempts + 1})
                now = time.time()
                again = msgspec.structs.replace(e, attempts=e.attempts + 1, owner=self.owner,
                                                claimed_at=now, lease_s=self.lease_s,
                                                renewed_at=now)
                return [await self._execute(event, await self.ledger.replace(rec, again))]
            detail = f"executor lost mid-execution ({e.owner}); not re-run: {why.reason}"
        else:
            detail = (f"executor lost mid-execution ({e.owner}); not repeated (not "
                      "idempotent): its effect may or may not have happened")
        result = self._result(event, "unknown", detail, e.claimed_at)
        await self.ledger.finish(rec, result)
        log.error("outcome unknown", extra={"execution_id": e.execution_id, "detail": detail})
        return [self._done(result)]

    async def _execute(self, event: ExecutionApproved, rec: Record) -> ExecutionResult:
        eid = event.execution_id
        step = event.step
        started = time.time()
        run = Running(event, rec)
        self.running[eid] = run  # before the last look, so a kill from now on reaches it
        renewer = asyncio.create_task(self._renew(run))
        try:
            await self.rt.publish(ExecutionStarted(
                id=derive_id("started", eid, rec.entry.attempts), incident_id=event.incident_id,
                causation_id=event.id, subject=event.subject, execution_id=eid,
                plan_id=event.plan_id, action=step.action))
            await self._reached("started_published")
            client = self._client(event.subject)
            # The subject's own check on fresh state (etcd: every other member up), before
            # the last look, so that no await sits between the look and the start.
            blocked = await self._precondition(client, step) if step.disruptive else None
            why = blocked or await self._refusal(event, last_look=True)
            if why is None:
                why = run.cancel  # seen by a watch while we looked
            if why is not None:
                result = self._result(event, "skipped", why.reason, started, rule=why.rule)
            else:
                # No await since the look above: a kill from here on finds the task.
                run.task = asyncio.create_task(self._tries(client, event, run))
                log.info("running", extra={"execution_id": eid, "action": step.action})
                done, _ = await asyncio.wait({run.task}, timeout=_budget(step))
                result = self._classify(event, run, bool(done), started)
        finally:
            if run.task is not None and not run.task.done():
                run.task.cancel()  # our handler was cancelled, or the step timed out
            run.stop_renewing.set()
            with contextlib.suppress(Exception):
                await renewer  # at most one renewal in flight: then run.record is current
            self.running.pop(eid, None)
            run.done.set()
        if not run.lost_lease:
            try:
                await self.ledger.finish(run.record, result)
            except LedgerConflict:
                run.lost_lease = True  # settled by another executor while we were away
        if run.lost_lease:
            return await self._stand_down(eid)
        self.m_duration.labels(action=step.action).observe(result.finished_at - started)
        return self._done(result)

    async def _stand_down(self, eid: str) -> ExecutionResult:
        """Our lease lapsed (we hung or were stopped) and another executor settled the
        execution: its outcome stands, ours is dropped."""
        now = await self.ledger.read(eid)
        owner = now.entry.owner if now is not None else "?"
        log.warning("lost the ledger lease: another executor settled this execution",
                    extra={"execution_id": eid, "owner": owner})
        if now is None or now.entry.result is None:  # still being re-run: ask again later
            raise LostLease(f"execution {eid} is now {owner}'s; no outcome recorded yet")
        return now.entry.result

    async def _renew(self, run: Running) -> None:
        """Renew the lease until told to stop; losing it stops the action."""
        interval = self.lease_s / 3
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(run.stop_renewing.wait(), interval)
            if run.stop_renewing.is_set():
                return
            try:
                run.record = await self.ledger.renew(run.record, time.time())
            except LedgerConflict:
                run.lost_lease = True
                self._cancel(run, LOST_LEASE)
                return
            except Exception as exc:  # a NATS hiccup: try again next interval
                log.warning("lease renewal failed",
                            extra={"execution_id": run.approved.execution_id, "err": repr(exc)})

    async def _precondition(self, client: ActionClientProtocol,
                            step: PlanStep) -> Refusal | None:
        """Why a disruptive step must not start now, per the subject; a check that
        cannot be made refuses (fail closed)."""
        try:
            why = await asyncio.wait_for(client.precondition(step.action, dict(step.params)),
                                         step.timeout_s)
        except Exception as exc:
            why = f"{step.action}: the precondition could not be checked: {exc!r}"
        return Refusal("precondition", why) if why else None

    async def _tries(self, client: ActionClientProtocol, event: ExecutionApproved,
                     run: Running) -> str:
        """The action, tried as its retry policy says: only failures retry (a kill or a
        revocation cancels this task, and nothing after), never an ActionError whose code
        says a retry cannot help (refused, invalid), and a timeout only if the policy
        says so."""
        step = event.step
        policy = self._retry_policy(event)
        while True:
            run.tries += 1
            try:
                # Our bound fires first (-> timed_out); the client's own is a backstop.
                return await asyncio.wait_for(
                    client.run(step.action, dict(step.params), step.timeout_s + GRACE_S),
                    step.timeout_s)
            except ActionError as exc:
                if run.tries >= step.attempts or exc.code in policy.not_retryable:
                    raise
                why = str(exc)
            except TimeoutError:
                if run.tries >= step.attempts or not policy.retry_timeouts:
                    raise
                why = f"no answer within {step.timeout_s:g}s"
            except Exception as exc:  # the subject failed it (HTTP 500, etcd error, ...)
                if run.tries >= step.attempts:
                    raise
                why = f"{type(exc).__name__}: {exc}"
            pause = policy.backoff(run.tries)
            log.info("retrying", extra={"execution_id": event.execution_id, "try": run.tries,
                                        "pause_s": pause, "why": why[:300]})
            await asyncio.sleep(pause)

    def _retry_policy(self, event: ExecutionApproved) -> RetryPolicy:
        """The registry's policy; the approved step's `attempts` caps it."""
        sc = self.config.subjects.get(event.subject)
        spec = subjects.definition_of(sc).actions.get(event.step.action) if sc else None
        return spec.retry if spec is not None else NO_RETRY

    def _classify(self, event: ExecutionApproved, run: Running, done: bool,
                  started: float) -> ExecutionResult:
        assert run.task is not None
        maybe = "" if event.step.idempotent else "; its effect may or may not have happened"
        tries = f" (after {run.tries} tries)" if run.tries > 1 else ""
        if not done:
            return self._result(event, "timed_out", f"no answer within "
                                f"{_budget(event.step):g}s{tries}{maybe}", started, run.tries)
        if run.task.cancelled():  # only _cancel cancels it, after setting run.cancel
            why = run.cancel or Refusal("", "None")
            return self._result(event, "cancelled", f"{why.reason}{maybe}", started,
                                run.tries, rule=why.rule)
        exc = run.task.exception()
        if isinstance(exc, TimeoutError):
            return self._result(event, "timed_out", f"no answer within "
                                f"{event.step.timeout_s:g}s{tries}{maybe}", started, run.tries)
        if isinstance(exc, ActionError):
            return self._result(event, "failed", f"{exc}{tries}", started, run.tries)
        if exc is not None:
            return self._result(event, "failed", f"{type(exc).__name__}: {exc}{tries}",
                                started, run.tries)
        return self._result(event, "succeeded", run.task.result(), started, run.tries)

    async def _refusal(self, event: ExecutionApproved,
                       last_look: bool = False) -> Refusal | None:
        """Why this approval must not be acted on now, or None (fresh `get`s, fail closed).

        The four reads go out at once: one round trip, and one await point.
        """
        kill, revoked, mode_raw, resolved_at = await asyncio.gather(
            read_kill(self.gkv), self.gkv.get_bytes(revoked_key(event.execution_id)),
            self.gkv.get_bytes(MODE_KEY), self._resolved_at(event.incident_id))
        mode = parse_mode(mode_raw)
        if last_look:
            await self._reached("looked")
        return refusal(event, kill=kill, revoked=revoked, mode=mode, now=time.time(),
                       resolved_at=resolved_at) or unrunnable(event, self.config.subjects)

    async def _resolved_at(self, incident_id: str) -> float | None:
        """When the detector resolved the incident, per the verifier's record; None if it
        is not resolved, or unknown (no record, or one that does not decode: the other
        checks still stand, and a fix for a broken subject must not wait on this one)."""
        if not incident_id:
            return None
        try:
            got = await self.incidents.get(incident_key(incident_id))
        except Unreadable:
            return None
        return None if got is None else got.value.resolved_at

    def _client(self, subject: str) -> ActionClientProtocol:
        if subject not in self.clients:
            sc = self.config.subjects[subject]
            self.clients[subject] = subjects.definition_of(sc).make_action_client(sc)
        return self.clients[subject]

    def _result(self, event: ExecutionApproved, status: ExecutionStatus, detail: str,
                started: float, tries: int = 0, rule: str = "") -> ExecutionResult:
        return ExecutionResult(
            id=derive_id("result", event.execution_id), incident_id=event.incident_id,
            causation_id=event.id, subject=event.subject, execution_id=event.execution_id,
            plan_id=event.plan_id, action=event.step.action, status=status,
            detail=detail[:2000], started_at=started, finished_at=time.time(), tries=tries,
            rule=rule)

    def _done(self, result: ExecutionResult) -> ExecutionResult:
        self.m_exec.labels(action=result.action, status=result.status).inc()
        log.info("result", extra={"execution_id": result.execution_id, "status": result.status,
                                  "detail": result.detail[:300]})
        return result

    # --- kill and revoke while running ---------------------------------------------------

    def _cancel(self, run: Running, why: Refusal, kill_at: float = 0.0) -> None:
        """The first reason wins. Before the task exists, the reason alone stops it
        from starting (_execute looks at it last); after, the task is cancelled."""
        if run.cancel is not None:
            return
        run.cancel = why
        if run.task is not None and not run.task.done():
            run.task.cancel()
            if kill_at:
                self.m_kill.observe(max(0.0, time.time() - kill_at))
            log.warning("cancelled", extra={"execution_id": run.approved.execution_id,
                                            "reason": why.reason, "rule": why.rule})

    def _on_kill(self, flag: KillFlag) -> None:
        if flag.engaged:
            for run in list(self.running.values()):
                self._cancel(run, kill_refusal(flag), flag.at)

    async def _watch_kill(self) -> None:
        async def on_value(_key: str, value: bytes | None) -> None:
            flag = parse_kill(value)  # deleted (None) reads as engaged, as everywhere
            if flag.engaged and not flag.at:  # unreadable (or undated): time it from now
                flag = msgspec.structs.replace(flag, at=time.time())
            self._on_kill(flag)

        await watch_forever(self.rt.nc, self.gkv, KILL_KEY, on_value)

    async def _watch_revocations(self) -> None:
        async def on_value(key: str, value: bytes | None) -> None:
            run = self.running.get(key[len(REVOKED_PREFIX):])
            if run is not None and value is not None:
                self._cancel(run, revoke_refusal(value))

        await watch_forever(self.rt.nc, self.gkv, REVOKED_PREFIX + ">", on_value)

    async def _poll(self) -> None:
        """The fallback if a watch stalls: re-read the flags of what is running."""
        while True:
            await asyncio.sleep(POLL_S)
            if not self.running:
                continue
            try:
                self._on_kill(await read_kill(self.gkv))
                for eid, run in list(self.running.items()):
                    revoked = await self.gkv.get_bytes(revoked_key(eid))
                    if revoked is not None:
                        self._cancel(run, revoke_refusal(revoked))
            except Exception as exc:  # a NATS hiccup must not end the actor
                log.warning("kill/revoke poll failed", extra={"err": repr(exc)})


ACTOR = Executor


def unrunnable(event: ExecutionApproved,
               configured: Mapping[str, SubjectConfig]) -> Refusal | None:
    """Why this executor cannot run the step at all, or None: the subject is not
    configured here, its kind has no registry or not this action, or bad parameters."""
    sc = configured.get(event.subject)
    if sc is None:
        return Refusal("not_configured", f"subject {event.subject!r} is not configured here")
    try:
        spec = subjects.definition_of(sc).actions.get(event.step.action)
    except Exception as exc:
        return Refusal("registry", f"no action registry for kind {sc.kind!r}: {exc!r}")
    if spec is None:  # the governor checked; we never act on an unregistered action
        return Refusal("registry",
                       f"action {event.step.action!r} is not registered for kind {sc.kind!r}")
    try:
        spec.validate(event.step.params)
    except ActionError as exc:
        return Refusal("params", str(exc))
    return None


def _budget(step: PlanStep) -> float:
    """The longest the whole step may take: every try and every pause."""
    return max(step.budget_s, step.timeout_s)
