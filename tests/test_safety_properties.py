"""Property test: the safety rules hold under any interleaving (hypothesis state machine).

The crew's pure rules, wired the way the actors wire them: the planner's state
machine (actors/planner/attempts.py), the governor's judgement and usage
windows (actors/governor/policy.py), the kill switch's reading
(bus_schemas.governor.kill_state), the executor's last look
(actors/executor/admission.py) and the ledger lease (LeaseWatch). Hypothesis
interleaves incidents, human approvals and denials, kills (by the operator and
by hand: a forged release, a `kv del`), resumes, revocations, mode changes,
clock steps, executors picking up approvals, finishing, crashing and hanging.

After every step the safety invariants are checked against the model's own
ground truth (what the operator last did, not what the flag parses to), and
after every run the liveness ones: once the clock runs on and the executors
drain, every step has ended and every incident has ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import subjects
from actors.executor.admission import refusal
from actors.executor.ledger import LeaseWatch
from actors.governor import policy
from actors.planner import attempts
from actors.planner.attempts import IncidentState, Rules, apply, unpark
from actors.runtime import derive_id
from actors.runtime.config import GovernorConfig
from bus_schemas import messages as m
from bus_schemas.governor import (
    KillFlag,
    Release,
    Revocation,
    encode_kill,
    encode_release,
    encode_revocation,
    kill_state,
)
from tests.harness import governed

ACTIONS = subjects.load("webshop").actions
NAMES = sorted(ACTIONS)
SUBJECT = "shop"
LEASE_S = 10.0
SLOT_GRACE_S = 30.0

Mode = Literal["observe", "approve", "execute"]

# Crew._truth_allows's first word -> the rule the executor's refusal must name.
TRUTH_RULES = {"killed": "kill", "revoked": "revoked", "expired": "approval_expired",
               "mode": "mode"}


PlannerStep = attempts.Step


@dataclass
class Step:
    """One plan step as the governor, the executors and the planner see it."""

    eid: str
    incident: str
    plan: m.Plan
    status: str = "waiting"  # awaiting | approved | ended
    approval: m.ExecutionApproved | None = None
    pending_until: float = 0.0
    in_stream: bool = False  # an approval waiting for (re)delivery to an executor
    slot_until: float = 0.0


Owner = Literal["running", "stalled", "dead", "none"]


@dataclass
class Claim:
    """The ledger entry, and the executor that holds it.

    running: renews its lease and reacts to kills; stalled: alive but frozen (SIGSTOP,
    a GC pause), neither renewing nor acking; dead: SIGKILLed; none: settled.
    """

    idempotent: bool
    revision: int
    done: bool = False
    owner: Owner = "none"
    superseded: bool = False  # a stalled owner whose lease somebody else settled
    renewed_at: float = 0.0  # ground truth: the owner's last renewal (model time)
    watch: LeaseWatch | None = None  # a second executor waiting on the lease


@dataclass
class Start:
    eid: str
    at: float
    after_crash: bool


@dataclass
class World:
    now: float = 1_000.0
    rev: int = 0  # KV revisions, bucket-wide like JetStream's
    kill: tuple[bytes, int] | None = None
    release: bytes | None = None
    truly_released: bool = True  # ground truth: the last kill-affecting act was a resume
    revoked: dict[str, bytes] = field(default_factory=dict)
    mode: Mode = "execute"


class Crew(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = World()
        flag = encode_kill(KillFlag(engaged=False, by="provisioning"))
        self.w.kill = (flag, self._rev())
        self.w.release = encode_release(Release(revision=self.w.kill[1]))
        self.cfg = GovernorConfig(mode="execute", allow={SUBJECT: ["*"]},
                                  approval_above="low", max_concurrent=2,
                                  max_per_subject_per_minute=6, max_per_minute=20,
                                  action_cooldown_s=5.0, approval_timeout_s=600.0,
                                  approval_ttl_s=60.0)
        self.usage = policy.Usage()
        self.rules = Rules(max_attempts=3, spec_for=lambda _s, a: ACTIONS.get(a))
        self.incidents: dict[str, IncidentState | None] = {}
        self.diagnosed: dict[str, list[m.RecommendedAction]] = {}
        self.steps: dict[str, Step] = {}
        self.claims: dict[str, Claim] = {}
        self.starts: list[Start] = []
        self.violations: list[str] = []

    # --- plumbing -------------------------------------------------------------------------

    def _rev(self) -> int:
        self.w.rev += 1
        return self.w.rev

    def _planner(self, event: m.Event) -> None:
        """The planner hears a step's end as the governor's PlanEnded (one-step plans)."""
        iid = event.incident_id
        ended = governed(event)
        if ended is not None:
            self._planner_step(iid, apply(self.incidents.get(iid), ended, self.rules,
                                          self.w.now))

    def _planner_step(self, iid: str, step: PlannerStep | None) -> None:
        if step is None:
            return
        self.incidents[iid] = step.state
        for out in step.events:
            if isinstance(out, m.Plan) and out.steps:
                self._governor_plan(out)
            elif isinstance(out, m.DiagnosisRequested):
                # The diagnoser answers at once: the first diagnosis's actions, minus
                # those tried and failed (the evidence never changes in this model).
                tried = {h.action for h in out.history}
                self._planner(m.Diagnosis(
                    incident_id=iid, subject=SUBJECT, invariant="p99", hypothesis="h",
                    request_id=out.id, actions=[a for a in self.diagnosed[iid]
                                                if a.action not in tried]))

    def _wake(self, kinds: tuple[str, ...] = ()) -> None:
        """The planner's background loop: parked incidents whose obstacle lifted (a
        PolicyChanged for kill and mode) or whose backoff ran out are planned again."""
        for iid, state in list(self.incidents.items()):
            if state is not None and state.parked and (
                    state.parked in kinds or state.retry_at <= self.w.now):
                cause = m.Event(id=derive_id("tick", iid, state.plans), incident_id=iid)
                self._planner_step(iid, unpark(state, cause, self.rules, self.w.now))

    def _kill_engaged(self) -> bool:
        return kill_state(self.w.kill, self.w.release).engaged

    def _decide(self, s: Step, outcome: m.DecisionOutcome, ends: bool) -> None:
        s.status = "ended" if ends else s.status
        self._planner(m.Decision(incident_id=s.incident, subject=SUBJECT, outcome=outcome,
                                 reason=outcome, plan_id=s.plan.plan_id, execution_id=s.eid,
                                 ends_step=ends))

    def _governor_plan(self, plan: m.Plan) -> None:
        ps = plan.steps[0]
        eid = derive_id("exec", plan.plan_id, ps.step_id)
        s = self.steps[eid] = Step(eid, plan.incident_id, plan)
        self._judge(s, human=False)

    def _judge(self, s: Step, human: bool) -> None:
        ps = s.plan.steps[0]
        j = policy.judge(ps, subject=SUBJECT, kind="webshop", actions=ACTIONS, cfg=self.cfg,
                         mode=self.w.mode, kill_engaged=self._kill_engaged(),
                         usage=self.usage, now=self.w.now, execution_id=s.eid,
                         human_approved=human)
        if j.outcome == "veto":
            self._decide(s, "vetoed", ends=True)
        elif j.outcome == "await_human":
            s.status, s.pending_until = "awaiting", self.w.now + self.cfg.approval_timeout_s
            self._decide(s, "awaiting_approval", ends=False)
        else:
            if not self.w.truly_released or self.w.mode == "observe" or (
                    self.w.mode == "approve" and not human):
                self.violations.append(f"{s.eid} approved in mode {self.w.mode}, "
                                       f"released={self.w.truly_released}")
            s.approval = m.ExecutionApproved(
                incident_id=s.incident, subject=SUBJECT, execution_id=s.eid,
                plan_id=s.plan.plan_id, step=j.step, ts=self.w.now,
                approved_by="ana" if human else "policy",
                not_after=self.w.now + self.cfg.approval_ttl_s)
            s.slot_until = s.approval.not_after + j.step.timeout_s + SLOT_GRACE_S
            slot = policy.Slot(subject=SUBJECT, action=ps.action, plan_id=s.plan.plan_id,
                               incident_id=s.incident, until=s.slot_until)
            self.usage = policy.record_release(self.usage, s.eid, j.step, SUBJECT,
                                               self.w.now, slot)
            s.status, s.in_stream = "approved", True

    def _result(self, s: Step, status: m.ExecutionStatus, rule: str = "") -> None:
        """The executor records and reports; the governor frees the slot; the verifier (for
        a success) passes or fails it at once."""
        self.usage = policy.free_slot(self.usage, s.eid)
        if s.status == "ended":
            return  # already ended (expired): the planner moved on; this one is late
        s.status = "ended"
        res = m.ExecutionResult(incident_id=s.incident, subject=SUBJECT, execution_id=s.eid,
                                plan_id=s.plan.plan_id, action=s.plan.steps[0].action,
                                status=status, rule=rule)
        self._planner(res)
        if status == "succeeded":
            self._planner(m.Verdict(incident_id=s.incident, subject=SUBJECT,
                                    plan_id=s.plan.plan_id, invariant="p99", passed=True,
                                    reason="healthy"))

    def _truth_allows(self, a: m.ExecutionApproved) -> str:
        """Why, by ground truth, this approval must not start now ("" if it may)."""
        if not self.w.truly_released:
            return "killed"
        if a.execution_id in self.w.revoked:
            return "revoked"
        if self.w.now > a.not_after:
            return "expired"
        if self.w.mode == "observe" or (self.w.mode == "approve" and a.approved_by == "policy"):
            return f"mode {self.w.mode}"
        return ""

    # --- incidents and humans ---------------------------------------------------------------

    @rule(first=st.sampled_from(NAMES), rest=st.lists(st.sampled_from(NAMES), max_size=3))
    def incident(self, first: str, rest: list[str]) -> None:
        if len(self.incidents) >= 6:
            return
        d = m.Diagnosis(incident_id=f"incident{len(self.incidents)}", subject=SUBJECT,
                        invariant="p99", hypothesis="h", actions=[m.RecommendedAction(action=a)
                                                 for a in [first, *rest]])
        self.incidents[d.incident_id] = None
        self.diagnosed[d.incident_id] = list(d.actions)
        self._planner(d)

    def _awaiting(self) -> list[Step]:
        return [s for s in self.steps.values() if s.status == "awaiting"]

    @precondition(lambda self: bool(self._awaiting()))
    @rule(data=st.data(), approve=st.booleans())
    def human(self, data: st.DataObject, approve: bool) -> None:
        s = data.draw(st.sampled_from(self._awaiting()))
        if approve:
            self._judge(s, human=True)
        else:
            self._decide(s, "denied", ends=True)

    # --- the kill switch, revocations, the mode ---------------------------------------------

    @rule()
    def kill(self) -> None:
        self.w.kill = (encode_kill(KillFlag(engaged=True, by="ops", at=self.w.now)), self._rev())
        self.w.truly_released = False
        self._cancel_running("killed")

    @rule()
    def resume(self) -> None:  # the governor's resume: the only release
        self.w.kill = (encode_kill(KillFlag(engaged=False, by="ana")), self._rev())
        self.w.release = encode_release(Release(revision=self.w.kill[1], by="ana"))
        self.w.truly_released = True
        self._wake(("kill", "mode"))  # the governor's PolicyChanged

    @rule(delete=st.booleans())
    def forged_release(self, delete: bool) -> None:  # `kv del kill`, or a put by hand
        if delete:
            self.w.kill = None
        else:
            self.w.kill = (encode_kill(KillFlag(engaged=False, by="mallory")), self._rev())
        self.w.truly_released = False  # no resume caused it: it releases nothing

    @precondition(lambda self: bool(self.steps))
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        s = data.draw(st.sampled_from(sorted(self.steps.values(), key=lambda x: x.eid)))
        self.w.revoked[s.eid] = encode_revocation(Revocation(execution_id=s.eid, by="ana",
                                                             reason="r"))
        if s.status == "awaiting":
            self._decide(s, "revoked", ends=True)
        else:
            c = self.claims.get(s.eid)
            if c is not None and not c.done and c.owner == "running":
                self._finish_run(s, c, "cancelled")

    @rule(mode=st.sampled_from(["observe", "approve", "execute"]))
    def mode(self, mode: Mode) -> None:
        self.w.mode = mode
        self._wake(("kill", "mode"))  # the governor's PolicyChanged

    # --- time ------------------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.5, 3.0, 11.0, 61.0, 130.0, 700.0]))
    def tick(self, dt: float) -> None:
        self.w.now += dt
        for c in self.claims.values():
            if not c.done and c.owner == "running":  # it renewed all along
                c.revision, c.renewed_at = self._rev(), self.w.now
        for s in list(self.steps.values()):
            if s.status == "awaiting" and s.pending_until <= self.w.now:
                self._decide(s, "denied", ends=True)  # approval timed out
            elif (s.status == "approved" and s.slot_until <= self.w.now
                  and not self._held_by_anyone(s.eid)):
                self.usage = policy.free_slot(self.usage, s.eid)
                self._decide(s, "expired", ends=True)  # released; nobody reported
        self._wake()

    # --- executors ---------------------------------------------------------------------------

    def _held_by_anyone(self, eid: str) -> bool:
        c = self.claims.get(eid)
        return c is not None and not c.done and c.owner in ("running", "stalled")

    def _deliverable(self) -> list[Step]:
        return [s for s in self.steps.values() if s.in_stream]

    @precondition(lambda self: bool(self._deliverable()))
    @rule(data=st.data(), lease_age=st.sampled_from([0.0, 5.0, 10.0, 20.0]))
    def executor_picks(self, data: st.DataObject, lease_age: float) -> None:
        s = data.draw(st.sampled_from(sorted(self._deliverable(), key=lambda x: x.eid)))
        self._pick(s, lease_age)

    def _pick(self, s: Step, lease_age: float) -> None:
        """One delivery of s's approval to an executor, `lease_age` seconds of waiting on a
        claim it finds (if any) included."""
        assert s.approval is not None
        c = self.claims.get(s.eid)
        if c is None:
            why = refusal(s.approval, kill=kill_state(self.w.kill, self.w.release),
                          revoked=self.w.revoked.get(s.eid), mode=self.w.mode, now=self.w.now)
            s.in_stream = False
            if why is not None:
                truth = self._truth_allows(s.approval)
                if why.rule != TRUTH_RULES.get(truth.split(" ")[0]):
                    self.violations.append(f"{s.eid} refused by rule {why.rule!r} "
                                           f"({why.reason}), but the truth is {truth!r}")
                self.claims[s.eid] = Claim(s.approval.step.idempotent, self._rev(), done=True)
                self._result(s, "skipped", why.rule)  # as the executor reports it
                return
            self.claims[s.eid] = Claim(s.approval.step.idempotent, self._rev(), owner="running",
                                       renewed_at=self.w.now)
            self._record_start(s, after_crash=False)
            return
        if c.done:
            s.in_stream = False  # the recorded result is republished; dedup drops it
            return
        # A claim without an outcome: wait on its lease (renewed only by a running owner).
        if c.watch is None:
            c.watch = LeaseWatch(c.revision, LEASE_S, self.w.now)
        if c.owner == "running":
            c.revision, c.renewed_at = self._rev(), self.w.now + lease_age  # it renewed
        if not c.watch.lapsed(c.revision, LEASE_S, self.w.now + lease_age):
            return  # fresh: keep waiting (the message stays in our hands)
        if c.owner == "running" or self.w.now + lease_age - c.renewed_at < LEASE_S:
            self.violations.append(f"{s.eid}: taken over while its lease was fresh")
        s.in_stream = False
        c.watch = None
        c.superseded = c.owner == "stalled"
        if c.idempotent and refusal(s.approval, kill=kill_state(self.w.kill, self.w.release),
                                    revoked=self.w.revoked.get(s.eid), mode=self.w.mode,
                                    now=self.w.now) is None:
            c.revision, c.owner, c.renewed_at = self._rev(), "running", self.w.now
            self._record_start(s, after_crash=True)
        else:
            c.revision, c.done, c.owner = self._rev(), True, "none"
            self._result(s, "unknown")

    def _record_start(self, s: Step, after_crash: bool) -> None:
        assert s.approval is not None
        why = self._truth_allows(s.approval)
        if why:
            self.violations.append(f"{s.eid} started although {why}")
        if not after_crash and any(x.eid == s.eid for x in self.starts):
            self.violations.append(f"{s.eid} started twice")
        if after_crash and not s.approval.step.idempotent:
            self.violations.append(f"non-idempotent {s.eid} re-run after a crash")
        self.starts.append(Start(s.eid, self.w.now, after_crash))

    def _held(self, *owners: Owner) -> list[tuple[Step, Claim]]:
        return [(self.steps[e], c) for e, c in sorted(self.claims.items())
                if not c.done and c.owner in owners]

    def _finish_run(self, s: Step, c: Claim, status: m.ExecutionStatus) -> None:
        c.owner, c.done, c.revision = "none", True, self._rev()
        self._result(s, status)

    def _cancel_running(self, why: str) -> None:
        for s, c in self._held("running"):  # a stalled owner hears it when it wakes
            self._finish_run(s, c, "cancelled")

    @precondition(lambda self: bool(self._held("running")))
    @rule(data=st.data(), ok=st.booleans())
    def executor_finishes(self, data: st.DataObject, ok: bool) -> None:
        s, c = data.draw(st.sampled_from(self._held("running")))
        self._finish_run(s, c, "succeeded" if ok else "failed")

    @precondition(lambda self: bool(self._held("running", "stalled")))
    @rule(data=st.data())
    def executor_crashes(self, data: st.DataObject) -> None:
        s, c = data.draw(st.sampled_from(self._held("running", "stalled")))
        if c.owner == "running":
            c.renewed_at = self.w.now
        c.owner = "dead"  # SIGKILL: no renewals, no ack
        s.in_stream = True  # redelivered after ack_wait

    @precondition(lambda self: bool(self._held("running")))
    @rule(data=st.data())
    def executor_stalls(self, data: st.DataObject) -> None:
        s, c = data.draw(st.sampled_from(self._held("running")))
        c.owner, c.renewed_at = "stalled", self.w.now  # SIGSTOP: no renewals, no acks
        s.in_stream = True  # redelivered to another executor after ack_wait

    @precondition(lambda self: any(c.owner == "stalled" or c.superseded
                                   for c in self.claims.values()))
    @rule(data=st.data())
    def executor_wakes(self, data: st.DataObject) -> None:
        woken = [(e, c) for e, c in sorted(self.claims.items())
                 if c.owner == "stalled" or c.superseded]
        eid, c = data.draw(st.sampled_from(woken))
        if c.superseded:
            c.superseded = False  # its next renewal fails: it stands down, reports nothing
            return
        c.owner, c.renewed_at = "running", self.w.now  # SIGCONT: renews, hears kills again
        c.revision = self._rev()
        if not self.w.truly_released or eid in self.w.revoked:
            self._finish_run(self.steps[eid], c, "cancelled")

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def kill_state_matches_the_truth(self) -> None:
        assert self._kill_engaged() == (not self.w.truly_released)

    @invariant()
    def nothing_started_that_must_not_have(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def limits_hold(self) -> None:
        flying = [k for k, sl in self.usage.in_flight.items() if sl.until > self.w.now]
        assert len(flying) <= self.cfg.max_concurrent

    def teardown(self) -> None:
        # Liveness: the obstacles lift (the operator resumes, the mode is execute), the
        # clock runs and every executor drains; then every step and incident must have
        # ended (escalated counts: a human has it).
        self.resume()
        self.mode("execute")
        for _ in range(20):
            for s in list(self.steps.values()):
                if s.in_stream:
                    self._drain_one(s)
            for _eid, c in self.claims.items():
                if c.owner == "stalled":
                    c.owner = "dead"  # stalled for good: its lease lapses
            for s, c in self._held("running"):
                self._finish_run(s, c, "succeeded")
            self.tick(700.0)
        stuck = [(s.eid, s.status) for s in self.steps.values() if s.status != "ended"]
        assert not stuck, f"steps that never ended: {stuck}"
        open_ = [i for i, st_ in self.incidents.items() if st_ is None or not st_.closed]
        assert not open_, f"incidents that never ended: {open_}"
        assert not self.violations, self.violations

    def _drain_one(self, s: Step) -> None:
        for age in (0.0, 2 * LEASE_S):  # a first look, then long enough for any lease
            if s.in_stream:
                self._pick(s, age)


Crew.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])
test_safety_rules_hold_under_any_interleaving = Crew.TestCase


@given(gaps=st.lists(st.floats(min_value=0.0, max_value=9.99), min_size=1, max_size=50))
def test_a_lease_renewed_within_its_period_never_lapses(gaps: list[float]) -> None:
    watch = LeaseWatch(revision=1, lease_s=LEASE_S, since=0.0)
    now, rev = 0.0, 1
    for gap in gaps:
        now += gap
        rev += 1  # a renewal just before we look
        assert not watch.lapsed(rev, LEASE_S, now)
        assert not watch.lapsed(rev, LEASE_S, now + gap)  # looking again, still in time


@given(first_look=st.floats(min_value=0.0, max_value=100.0),
       waited=st.floats(min_value=0.0, max_value=100.0))
def test_a_lease_lapses_only_after_a_full_period_of_the_readers_own_clock(
        first_look: float, waited: float) -> None:
    # The reader starts timing when it first sees the claim, whatever the owner's clock said.
    watch = LeaseWatch(revision=7, lease_s=LEASE_S, since=first_look)
    assert watch.lapsed(7, LEASE_S, first_look + waited) == (waited >= LEASE_S)
