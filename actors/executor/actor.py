"""The executor: carries out approved executions, each effect at most once.

It consumes ExecutionApproved only (which only the governor may publish) and,
for each one:

1. Looks in the ledger (actors/executor/ledger.py). A recorded outcome is republished
   (same deterministic id, so dedup drops it) and nothing is done. A claim
   without an outcome means an executor died mid-effect: an idempotent step
   may run again (repeating it is harmless by definition); a non-idempotent
   one is reported `unknown` and never repeated.
2. Re-reads the kill flag, the revocation and the mode with a KV `get` (the
   watch may lag or have died) and refuses an approval past its not_after:
   a refusal is recorded and reported `skipped`.
3. Claims the execution with KV `create()`, publishes ExecutionStarted,
   looks once more, then runs the action through the subject's client with
   the step's timeout.
4. While it runs, a kill or a revocation (KV watch, re-created on reconnect,
   plus a periodic `get` as a fallback) cancels it at once: `cancelled`.
5. Records the outcome in the ledger, then publishes ExecutionResult.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec

import subjects
from actors.executor.ledger import Ledger, LedgerEntry, Record
from actors.runtime import Actor, Delivery, Reject, derive_id
from actors.runtime.killswitch import read_kill
from actors.runtime.kv import Bucket, watch_forever
from actors.runtime.logs import get_logger
from actors.runtime.metrics import LATENCY_BUCKETS
from bus_schemas import catalog
from bus_schemas.governor import (
    KILL_KEY,
    MODE_KEY,
    REVOKED_PREFIX,
    KillFlag,
    parse_kill,
    parse_mode,
    parse_revocation,
    revoked_key,
)
from bus_schemas.messages import (
    Event,
    ExecutionApproved,
    ExecutionResult,
    ExecutionStarted,
    ExecutionStatus,
)
from subjects.base import ActionClientProtocol, ActionError

log = get_logger("menders.executor")

POLL_S = 0.25  # fallback re-read of the kill flag and revocations while something runs
GRACE_S = 1.0  # the client's own timeout is this much longer than ours
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

@dataclass
class Running:
    approved: ExecutionApproved
    task: asyncio.Task[str] | None = None
    cancel_reason: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Executor(Actor):
    name = "executor"

    async def setup(self) -> None:
        assert self.rt.js is not None
        self.gkv = Bucket(await self.rt.js.key_value(catalog.GOVERNOR_BUCKET))
        self.ledger = Ledger(await self.rt.js.key_value(catalog.EXEC_LEDGER_BUCKET))
        self.host = socket.gethostname()
        self.owner = f"{os.getpid()}@{self.host}/{self.rt.started_at:.6f}"
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

    def background(self) -> Sequence[Callable[[], Awaitable[None]]]:
        return (self._watch_kill, self._watch_revocations, self._poll)

    async def teardown(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                await client.close()

    # --- one approval ---------------------------------------------------------------------

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        if not isinstance(event, ExecutionApproved):
            raise Reject(f"the executor acts on ExecutionApproved only, not {type(event).__name__}")
        eid = event.execution_id
        while eid in self.running:  # redelivered while our own attempt still runs
            await self.running[eid].done.wait()
        rec = await self.ledger.read(eid)
        if rec is None:
            now = time.time()
            entry = LedgerEntry(execution_id=eid, plan_id=event.plan_id, subject=event.subject,
                                action=event.step.action, idempotent=event.step.idempotent,
                                owner=self.owner, claimed_at=now)
            refusal = await self._refusal(event)
            if refusal:
                result = self._result(event, "skipped", refusal, now)
                entry = msgspec.structs.replace(entry, state="done", result=result)
                if await self.ledger.claim(entry) is not None:
                    return [self._done(result)]
            else:
                claimed = await self.ledger.claim(entry)
                if claimed is not None:
                    return [await self._execute(event, claimed)]
            rec = await self.ledger.read(eid)  # somebody claimed it between our read and ours
            if rec is None:
                raise RuntimeError(f"ledger entry {eid} vanished")
        return await self._after_claim(event, rec)

    async def _after_claim(self, event: ExecutionApproved, rec: Record) -> list[Event]:
        """A claim exists: answer from the ledger, or settle an attempt that died."""
        e = rec.entry
        if e.result is not None:
            self.m_replayed.inc()
            log.info("already done: republishing the recorded result",
                     extra={"execution_id": e.execution_id, "status": e.result.status})
            return [e.result]
        if self._live_sibling(e.owner):
            # Another executor process on this host holds it and is alive: let it finish.
            raise RuntimeError(f"execution {e.execution_id} is being run by {e.owner}")
        if e.idempotent:
            refusal = await self._refusal(event)
            if not refusal:
                log.warning("re-running an idempotent step after a crash mid-execution",
                            extra={"execution_id": e.execution_id, "attempt": e.attempts + 1})
                again = msgspec.structs.replace(e, attempts=e.attempts + 1, owner=self.owner,
                                                claimed_at=time.time())
                return [await self._execute(event, await self.ledger.replace(rec, again))]
            detail = f"executor crashed mid-execution; not re-run: {refusal}"
        else:
            detail = "executor crashed mid-execution; not repeated (not idempotent)"
        result = self._result(event, "unknown", detail, e.claimed_at)
        await self.ledger.finish(rec, result)
        log.error("outcome unknown", extra={"execution_id": e.execution_id, "detail": detail})
        return [self._done(result)]

    async def _execute(self, event: ExecutionApproved, rec: Record) -> ExecutionResult:
        eid = event.execution_id
        step = event.step
        started = time.time()
        run = Running(event)
        self.running[eid] = run  # before the last look, so a kill from now on reaches it
        try:
            await self.rt.publish(ExecutionStarted(
                id=derive_id("started", eid, rec.entry.attempts), incident_id=event.incident_id,
                causation_id=event.id, subject=event.subject, execution_id=eid,
                plan_id=event.plan_id, action=step.action))
            refusal = run.cancel_reason or await self._refusal(event)
            if refusal:
                result = self._result(event, "skipped", refusal, started)
            else:
                client = self._client(event.subject)
                # Our bound fires first (-> timed_out); the client's own is a backstop.
                run.task = asyncio.create_task(client.run(step.action, dict(step.params),
                                                          step.timeout_s + GRACE_S))
                log.info("running", extra={"execution_id": eid, "action": step.action})
                done, _ = await asyncio.wait({run.task}, timeout=step.timeout_s)
                result = self._classify(event, run, bool(done), started)
        finally:
            if run.task is not None and not run.task.done():
                run.task.cancel()  # our handler was cancelled, or the step timed out
            self.running.pop(eid, None)
            run.done.set()
        await self.ledger.finish(rec, result)
        self.m_duration.labels(action=step.action).observe(result.finished_at - started)
        return self._done(result)

    def _classify(self, event: ExecutionApproved, run: Running, done: bool,
                  started: float) -> ExecutionResult:
        assert run.task is not None
        maybe = "" if event.step.idempotent else "; its effect may or may not have happened"
        if not done:
            return self._result(event, "timed_out",
                                f"no answer within {event.step.timeout_s:g}s{maybe}", started)
        if run.task.cancelled():
            return self._result(event, "cancelled", f"{run.cancel_reason}{maybe}", started)
        exc = run.task.exception()
        if isinstance(exc, TimeoutError):
            return self._result(event, "timed_out", f"{exc!r}{maybe}", started)
        if isinstance(exc, ActionError):
            return self._result(event, "failed", str(exc), started)
        if exc is not None:
            return self._result(event, "failed", f"{type(exc).__name__}: {exc}", started)
        return self._result(event, "succeeded", run.task.result(), started)

    async def _refusal(self, event: ExecutionApproved) -> str:
        """Why this approval must not be acted on now, or "" (fresh `get`s, fail closed)."""
        flag = await read_kill(self.gkv)
        if flag.engaged:
            return _kill_reason(flag)
        revoked = await self.gkv.get_bytes(revoked_key(event.execution_id))
        if revoked is not None:
            return _revoke_reason(revoked)
        if event.not_after and time.time() > event.not_after:
            return f"approval expired {time.time() - event.not_after:.1f}s ago (not_after)"
        mode = parse_mode(await self.gkv.get_bytes(MODE_KEY))
        if mode not in ("approve", "execute"):
            return f"mode is {mode or 'unset'}: nothing executes"
        sc = self.config.subjects.get(event.subject)
        if sc is None:
            return f"subject {event.subject!r} is not configured here"
        try:
            spec = subjects.load(sc.kind).actions.get(event.step.action)
        except Exception as exc:
            return f"no action registry for kind {sc.kind!r}: {exc!r}"
        if spec is None:  # the governor checked; we never act on an unregistered action
            return f"action {event.step.action!r} is not registered for kind {sc.kind!r}"
        try:
            spec.validate(event.step.params)
        except ActionError as exc:
            return str(exc)
        return ""

    def _client(self, subject: str) -> ActionClientProtocol:
        if subject not in self.clients:
            sc = self.config.subjects[subject]
            self.clients[subject] = subjects.load(sc.kind).make_action_client(sc)
        return self.clients[subject]

    def _live_sibling(self, owner: str) -> bool:
        """Is `owner` another executor process on this host that is still alive?"""
        pid_s, _, rest = owner.partition("@")
        host = rest.rpartition("/")[0]
        if owner == self.owner or host != self.host or not pid_s.isdigit():
            return False
        try:
            os.kill(int(pid_s), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _result(self, event: ExecutionApproved, status: ExecutionStatus, detail: str,
                started: float) -> ExecutionResult:
        return ExecutionResult(
            id=derive_id("result", event.execution_id), incident_id=event.incident_id,
            causation_id=event.id, subject=event.subject, execution_id=event.execution_id,
            plan_id=event.plan_id, action=event.step.action, status=status,
            detail=detail[:2000], started_at=started, finished_at=time.time())

    def _done(self, result: ExecutionResult) -> ExecutionResult:
        self.m_exec.labels(action=result.action, status=result.status).inc()
        log.info("result", extra={"execution_id": result.execution_id, "status": result.status,
                                  "detail": result.detail[:300]})
        return result

    # --- kill and revoke while running ---------------------------------------------------

    def _cancel(self, run: Running, reason: str, kill_at: float = 0.0) -> None:
        if run.cancel_reason:
            return
        run.cancel_reason = reason
        if run.task is not None and not run.task.done():
            run.task.cancel()
            if kill_at:
                self.m_kill.observe(max(0.0, time.time() - kill_at))
            log.warning("cancelled", extra={"execution_id": run.approved.execution_id,
                                            "reason": reason})

    def _on_kill(self, flag: KillFlag) -> None:
        if flag.engaged:
            for run in list(self.running.values()):
                self._cancel(run, _kill_reason(flag), flag.at)

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
                self._cancel(run, _revoke_reason(value))

        await watch_forever(self.rt.nc, self.gkv, REVOKED_PREFIX + ">", on_value)

    async def _poll(self) -> None:
        """The fallback if a watch stalls: re-read the flags of what is running."""
        while True:
            await asyncio.sleep(POLL_S)
            if not self.running:
                continue
            try:
                self._on_kill(parse_kill(await self.gkv.get_bytes(KILL_KEY)))
                for eid, run in list(self.running.items()):
                    revoked = await self.gkv.get_bytes(revoked_key(eid))
                    if revoked is not None:
                        self._cancel(run, _revoke_reason(revoked))
            except Exception as exc:  # a NATS hiccup must not end the actor
                log.warning("kill/revoke poll failed", extra={"err": repr(exc)})


def _kill_reason(flag: KillFlag) -> str:
    return f"kill switch engaged by {flag.by or 'unknown'}" + (
        f": {flag.reason}" if flag.reason else "")


def _revoke_reason(value: bytes) -> str:
    rev = parse_revocation(value)
    if rev is None:
        return "revoked"
    return f"revoked by {rev.by}" + (f": {rev.reason}" if rev.reason else "")


ACTOR = Executor
