"""The whole loop, end to end, with real processes: the demo, and the operator's CLI.

Every test runs the whole stack (the bundled nats-server, the webshop with its
load generator, and the eight actors, each its own process), breaks the shop
through its chaos port (which no actor is given), and drives the crew only
through `python -m actors ...` run as a subprocess, the way an operator would.
Nothing here asserts a duration: deadlines only bound the waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.aio.client import Client

from actors.cli.demo import demo_body
from actors.runtime.config import load
from actors.stack.natsserver import free_port
from actors.stack.up import Stack
from bus_schemas import catalog
from bus_schemas import messages as m
from bus_schemas.natsconf import inbox_prefix
from subjects.webshop.faults import FAULTS
from tests.harness import REPO, Collector, require_nats_server

SUBJECT = "webshop"
EXEC_KINDS = (m.ExecutionApproved, m.ExecutionStarted, m.ExecutionResult)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDERS_")}
    env["MENDERS_HOME"] = str(home)
    env.update(extra)
    return env


# --- a) the demo ----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_demo_remediates_every_fixable_fault_and_escalates_upstream_down(
        tmp_path: Path) -> None:
    require_nats_server()
    out = subprocess.run([sys.executable, "-m", "actors", "demo", "--quiet"],
                         env=clean_env(tmp_path / "home", TMPDIR=str(tmp_path)), cwd=REPO,
                         capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    outcomes: dict[str, str] = {}
    for line in out.stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0] in {f.name for f in FAULTS}:
            outcomes[cells[0]] = cells[-1]
    expected = {f.name: "remediated" if f.fixable else "escalated" for f in FAULTS}
    assert outcomes == expected, out.stdout[-4000:]
    assert "every fault handled as expected" in out.stdout


# --- the stack, driven through the CLI --------------------------------------------------


@dataclass
class Running:
    stack: Stack
    home: Path
    config_path: Path
    chaos_url: str
    col: Collector
    nc: Client

    async def cli(self, *args: str, timeout: float = 30.0) -> tuple[int, str, str]:
        """`python -m actors --config <cfg> <args>` as its own process, as an operator runs it."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "actors", "--config", str(self.config_path), *args,
            env=clean_env(self.home), cwd=REPO, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def chaos(self, method: str, fault: str) -> None:
        async with aiohttp.ClientSession() as s, s.request(
                method, f"{self.chaos_url}/faults/{fault}",
                timeout=aiohttp.ClientTimeout(total=10)) as resp:
            assert resp.status == 200, await resp.text()

    def since(self, t0: float, kind: type[m.Event] | tuple[type[m.Event], ...]) -> list[
            m.Event]:
        return [e for e in self.col.events() if isinstance(e, kind) and e.ts >= t0]

    def open_incidents(self) -> set[str]:
        """Incidents the detector still holds open (escalated or verified ones included)."""
        opened: set[str] = set()
        for e in self.col.events():
            if isinstance(e, m.IncidentOpened):
                opened.add(e.incident_id)
            elif isinstance(e, m.IncidentResolved):
                opened.discard(e.incident_id)
        return opened

    async def baseline(self, timeout: float = 60.0) -> None:
        """Observations flowing, the shop up, no incident open, for 3 s in a row."""
        deadline = time.monotonic() + timeout
        healthy_since: float | None = None
        while time.monotonic() < deadline:
            obs = self.col.events(m.Observation)
            fine = bool(obs) and obs[-1].up and time.time() - obs[-1].ts < 3 and not (
                self.open_incidents())
            if fine:
                healthy_since = healthy_since or time.monotonic()
                if time.monotonic() - healthy_since >= 3.0:
                    return
            else:
                healthy_since = None
            await asyncio.sleep(0.25)
        raise AssertionError(f"no healthy baseline; open: {self.open_incidents()}; logs in "
                             f"{self.home / 'logs'}")

    async def wait(self, pred: Callable[[m.Event], bool], timeout: float = 45.0,
                   count: int = 1) -> list[m.Event]:
        return await self.col.wait_for(pred, timeout=timeout, count=count)

    def action_calls(self) -> list[str]:
        """What the shop's own log says its action endpoint did (every rotated file too)."""
        logs = self.home / "subjects" / SUBJECT / "logs"
        calls = []
        for path in sorted(logs.glob("app.log*")):
            for line in path.read_text(errors="replace").splitlines():
                if '"msg":"action"' in line:
                    calls.append(json.loads(line)["action"])
        return calls

    async def remediated_after(self, t0: float, fault: str) -> m.Verdict:
        """Inject `fault` and wait until the crew verifies a fix of one of its incidents."""
        await self.chaos("POST", fault)
        try:
            found = await self.wait(lambda e: isinstance(e, m.Verdict) and e.passed
                                    and e.ts >= t0 and e.subject == SUBJECT, timeout=60)
        except AssertionError as exc:
            seen = [f"{type(e).__name__}:{getattr(e, 'outcome', '')}"
                    f"{getattr(e, 'status', '')}:{getattr(e, 'reason', '')[:80]}"
                    for e in self.col.events() if e.ts >= t0
                    and not isinstance(e, m.Heartbeat | m.Observation)]
            raise AssertionError(f"{fault} not remediated: {exc}; since then: {seen}") from None
        verdict = found[0]
        assert isinstance(verdict, m.Verdict)
        return verdict


def stack_config(home: Path, mode: str) -> str:
    """The demo's own config, in the given governor mode, metrics ports picked freely."""
    return demo_body(home, free_port(), free_port(), 0, mode=mode)


@contextlib.asynccontextmanager
async def running_stack(tmp_path: Path, mode: str, extra: str = "") -> AsyncIterator[Running]:
    require_nats_server()
    home = tmp_path / "home"
    home.mkdir()
    cfg = tmp_path / "menders.toml"
    cfg.write_text(stack_config(home, mode) + extra)
    stack = Stack(load(cfg), str(cfg), child_logs=True)
    nc: Client | None = None
    try:
        await stack.start()
        await stack.wait_ready(60)
        nc = await nats.connect(stack.url, user=catalog.OPERATOR,
                                password=stack.passwords[catalog.OPERATOR],
                                inbox_prefix=inbox_prefix(catalog.OPERATOR))
        col = Collector()
        await nc.subscribe(catalog.EVERYTHING, cb=col.on_msg)
        run = Running(stack, home, cfg, stack.chaos[SUBJECT], col, nc)
        await run.baseline()
        yield run
    finally:
        if nc is not None:
            await nc.close()
        await stack.stop()


def _of(incidents: set[str]) -> Callable[[m.Event], bool]:
    return lambda e: e.incident_id in incidents


# --- b) approve mode, e) the audit record --------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(170)
async def test_approve_mode_waits_for_menders_approve_then_the_record_verifies(
        tmp_path: Path) -> None:
    async with running_stack(tmp_path, "approve") as run:
        t0 = time.time()
        await run.chaos("POST", "bad_config")
        [waiting] = await run.wait(lambda e: isinstance(e, m.Decision) and e.ts >= t0
                                   and e.outcome == "awaiting_approval")
        assert isinstance(waiting, m.Decision) and waiting.step is not None
        eid, incident = waiting.execution_id, waiting.incident_id
        assert f"menders approve {eid}" in waiting.reason
        # Waiting for a human: nothing approved, nothing started, the shop untouched.
        assert not [e for e in run.since(t0, EXEC_KINDS) if e.execution_id == eid]  # type: ignore[attr-defined]
        assert run.action_calls() == []

        code, out, err = await run.cli("approve", eid, "--by", "alice", "--reason", "looks right")
        assert code == 0, err
        assert f"approval of {eid} sent" in out
        [approved] = await run.wait(lambda e: isinstance(e, m.ExecutionApproved)
                                    and e.execution_id == eid)
        assert isinstance(approved, m.ExecutionApproved) and approved.approved_by == "alice"
        [result] = await run.wait(lambda e: isinstance(e, m.ExecutionResult)
                                  and e.execution_id == eid)
        assert isinstance(result, m.ExecutionResult) and result.status == "succeeded"
        assert result.action in run.action_calls()
        [verdict] = await run.wait(lambda e: isinstance(e, m.Verdict)
                                   and e.incident_id == incident, timeout=60)
        assert isinstance(verdict, m.Verdict) and verdict.passed, verdict

        # e) The auditor's record: the chain verifies, the timeline runs opened -> verdict.
        wanted = ["incident.opened", "diagnosis", "plan", "decision",
                  "exec.approved", "exec.started", "exec.result", "verdict"]
        deadline = time.monotonic() + 30
        while True:
            code, out, err = await run.cli("audit", incident)
            assert code == 0, err
            kinds = [ln.split()[1] for ln in out.splitlines()[1:] if len(ln.split()) > 1]
            if "verdict" in kinds or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert out.splitlines()[0].startswith(f"incident {incident}:")
        assert kinds[0] == "incident.opened" and "verdict" in kinds, out
        positions = [kinds.index(k) for k in wanted]
        assert positions == sorted(positions), out
        code, out, err = await run.cli("audit", "--verify")
        assert code == 0, out + err
        assert out.startswith("chain OK:")


# --- c) observe mode ------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(170)
async def test_observe_mode_executes_nothing_parks_and_a_mode_change_remediates(
        tmp_path: Path) -> None:
    """Issue 9, "vetoes burn attempts": an observe-mode veto parks the incident (no
    attempt used, no escalation); `menders mode execute` plans it again and fixes it."""
    async with running_stack(tmp_path, "execute") as run:
        code, out, err = await run.cli("mode", "observe", "--reason", "change freeze")
        assert (code, out.strip()) == (0, "mode is now observe"), err

        t0 = time.time()
        await run.chaos("POST", "bad_config")
        vetoes = await run.wait(lambda e: isinstance(e, m.Decision) and e.ts >= t0
                                and e.outcome == "vetoed")
        incident = vetoes[0].incident_id
        assert "observe" in vetoes[0].reason  # type: ignore[attr-defined]
        [parked] = await run.wait(lambda e: isinstance(e, m.IncidentParked)
                                  and e.incident_id == incident)
        assert isinstance(parked, m.IncidentParked) and parked.obstacle == "mode"
        assert run.since(t0, EXEC_KINDS) == [] and run.action_calls() == []
        assert not [e for e in run.since(t0, m.IncidentEscalated) if e.incident_id == incident]

        t1 = time.time()
        code, out, err = await run.cli("mode", "execute")
        assert (code, out.strip()) == (0, "mode is now execute"), err
        await run.wait(lambda e: isinstance(e, m.Verdict) and e.passed  # type: ignore[attr-defined]
                       and e.incident_id == incident, timeout=60)
        healthy_after = time.time() - t1
        results = [e for e in run.since(t1, m.ExecutionResult) if e.incident_id == incident]
        assert [r.status for r in results] == ["succeeded"]  # type: ignore[attr-defined]
        assert run.action_calls() == ["rollback_config"]
        plans = [p for p in run.since(t0, m.Plan)
                 if p.incident_id == incident and p.steps]  # type: ignore[attr-defined]
        assert {p.attempt for p in plans} == {1}  # type: ignore[attr-defined]
        assert not [e for e in run.since(t0, m.IncidentEscalated)]
        print(f"\nobserve->execute: actions {run.action_calls()}, healthy "
              f"{healthy_after:.1f}s after the mode change, plans {len(plans)}")


# --- d) the kill switch -----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(170)
async def test_kill_switch_vetoes_park_without_attempts_and_resume_remediates(
        tmp_path: Path) -> None:
    """Issue 9, "vetoes burn attempts": under the kill switch every incident escalated
    within a second. Now its vetoes park it, and `menders resume` plans it again."""
    async with running_stack(tmp_path, "execute") as run:
        code, out, err = await run.cli("kill", "--by", "bob", "--reason", "drill")
        assert code == 0 and "ENGAGED" in out, err
        code, out, err = await run.cli("status", "--json")
        status = json.loads(out)
        assert status["kill"]["engaged"] is True and status["kill"]["by"] == "bob", out + err

        t0 = time.time()
        await run.chaos("POST", "bad_config")
        vetoes = await run.wait(lambda e: isinstance(e, m.Decision) and e.ts >= t0
                                and e.outcome == "vetoed")
        incident = vetoes[0].incident_id
        assert "kill switch engaged" in vetoes[0].reason  # type: ignore[attr-defined]
        [parked] = await run.wait(lambda e: isinstance(e, m.IncidentParked)
                                  and e.incident_id == incident)
        assert isinstance(parked, m.IncidentParked) and parked.obstacle == "kill"
        # Nothing was started, nothing escalated, no attempt used.
        assert not run.since(t0, (m.ExecutionApproved, m.ExecutionStarted))
        assert all(r.status == "skipped" for r in run.since(t0, m.ExecutionResult))  # type: ignore[attr-defined]
        assert run.action_calls() == []
        assert not run.since(t0, m.IncidentEscalated)
        t1 = time.time()
        code, out, err = await run.cli("resume", "--by", "bob")
        assert (code, out.strip()) == (0, "kill switch released"), err
        code, out, _ = await run.cli("status")
        assert "kill switch: released" in out

        # The fault is still there: the parked incident is planned again and fixed.
        await run.wait(lambda e: isinstance(e, m.Verdict) and e.passed  # type: ignore[attr-defined]
                       and e.incident_id == incident, timeout=60)
        healthy_after = time.time() - t1
        assert [r.status for r in run.since(t1, m.ExecutionResult)  # type: ignore[attr-defined]
                if r.incident_id == incident] == ["succeeded"]
        assert run.action_calls() == ["rollback_config"]
        assert not run.since(t0, m.IncidentEscalated)
        print(f"\nkill->resume: actions {run.action_calls()}, healthy {healthy_after:.1f}s "
              f"after resume, vetoes {len(run.since(t0, m.Decision))}")


# --- issue 9: the loop keeps working until the subject is healthy ---------------------------


def _closed_since(run: Running, t0: float) -> bool:
    """Every incident opened since t0 was resolved by the detector."""
    opened = {e.incident_id for e in run.since(t0, m.IncidentOpened)}
    resolved = {e.incident_id for e in run.since(t0, m.IncidentResolved)}
    return bool(opened) and opened <= resolved


async def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.25)


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_two_faults_at_once_the_second_is_fixed_after_a_fresh_diagnosis(
        tmp_path: Path) -> None:
    """Issue 9, "one diagnosis per incident": a leaked pool and the cache off at once.
    recycle_pool cures the leak; the latency incident that stays broken is diagnosed
    again on fresh symptoms (the cache is off) instead of working through the first
    diagnosis's stale alternatives (scale_pool, failover_dependency, then escalation)."""
    async with running_stack(tmp_path, "execute") as run:
        t0 = time.time()
        await run.chaos("POST", "pool_exhaustion")
        await run.chaos("POST", "cache_off")
        await run.wait(lambda e: isinstance(e, m.IncidentOpened) and e.ts >= t0)
        try:
            await _until(lambda: "enable_cache" in run.action_calls(), 180,
                         f"enable_cache never ran: {run.action_calls()}")
            await _until(lambda: _closed_since(run, t0), 60, "incidents left open")
        finally:
            lines = [f"{type(e).__name__} {e.incident_id[:8]} "
                     f"{getattr(e, 'reason', '') or getattr(e, 'status', '')}"[:160]
                     for e in run.col.events() if e.ts >= t0 and isinstance(e, (
                         m.Plan, m.DiagnosisRequested, m.IncidentEscalated, m.ExecutionResult,
                         m.Verdict, m.IncidentParked, m.IncidentResolved))]
            print("\n" + "\n".join(lines))
        healthy_after = time.time() - t0
        calls = run.action_calls()
        wrong = [c for c in calls if c not in ("recycle_pool", "enable_cache")]
        assert wrong == [], calls
        assert run.since(t0, m.DiagnosisRequested), "no fresh diagnosis was asked for"
        assert not run.since(t0, m.IncidentEscalated)
        print(f"two faults: actions {calls}, wrong {wrong}, healthy after {healthy_after:.1f}s")


@pytest.mark.e2e
@pytest.mark.timeout(200)
async def test_an_escalated_incident_stays_visible_re_enters_on_retry_and_ends_when_resolved(
        tmp_path: Path) -> None:
    """Issue 9, "an escalated incident is forgotten": the payments upstream is down (no
    action restores it), so the crew escalates; the incident stays listed as escalated
    and still broken, `menders retry` puts it back in the loop (a fresh diagnosis), and
    it ends only when the detector resolves it: "escalated, then resolved"."""
    async with running_stack(tmp_path, "execute") as run:
        t0 = time.time()
        await run.chaos("POST", "upstream_down")
        [esc] = await run.wait(lambda e: isinstance(e, m.IncidentEscalated) and e.ts >= t0,
                               timeout=60)
        incident = esc.incident_id
        code, out, err = await run.cli("status", "--json")
        listed = {i["incident_id"]: i for i in json.loads(out)["open_incidents"]}
        assert listed[incident]["state"] == "escalated", out + err

        code, out, err = await run.cli("retry", incident[:10], "--by", "ana",
                                       "--reason", "payments say it is back")
        assert code == 0, out + err
        assert f"retry of incident {incident}" in out and "planner:" in out
        [req] = await run.wait(lambda e: isinstance(e, m.DiagnosisRequested)
                               and e.incident_id == incident)
        assert isinstance(req, m.DiagnosisRequested) and "ana asked for a retry" in req.reason
        # Still the upstream: the fresh diagnosis asks for a human again; nothing ran.
        found = await run.wait(lambda e: isinstance(e, m.IncidentEscalated)
                               and e.incident_id == incident, count=2)
        assert found[1].id != found[0].id
        assert run.action_calls() == []

        await run.chaos("DELETE", "upstream_down")
        await run.wait(lambda e: isinstance(e, m.IncidentResolved) and e.incident_id == incident,
                       timeout=60)
        deadline = time.monotonic() + 30
        while True:
            code, out, err = await run.cli("audit")
            mine = [ln for ln in out.splitlines() if ln.startswith(incident)]
            if (mine and "escalated, then resolved" in mine[0]) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert mine and "escalated, then resolved" in mine[0], out + err
        code, out, err = await run.cli("audit", incident)
        assert "diagnosis.requested" in out and "incident.retry" in out, out
        code, out, err = await run.cli("retry", incident)
        assert code != 0 and "no open incident" in err
        print(f"\nescalated->retry->resolved: actions {run.action_calls()}, escalations "
              f"{len(found)}, human needed: yes (the upstream)")


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_a_flapping_fault_is_recognised_as_one_recurring_problem(tmp_path: Path) -> None:
    """Issue 9, "a flapping fault": the same fault, back again and again, was fixed each
    time and never recognised. Now the third time within the window is escalated once
    as a recurring problem, and each occurrence is still fixed."""
    extra = "\n[planner]\nrecurrence_count = 3\nrecurrence_window_s = 600\n"
    async with running_stack(tmp_path, "execute", extra) as run:
        t0 = time.time()
        verdicts = []
        for _ in range(3):
            t = time.time()
            verdicts.append(await run.remediated_after(t, "bad_config"))
            await run.chaos("DELETE", "bad_config")
            await run.baseline()
        [rec] = await run.wait(lambda e: isinstance(e, m.IncidentRecurring) and e.ts >= t0)
        assert isinstance(rec, m.IncidentRecurring)
        assert rec.count == 3 and rec.invariant == "error_rate" and len(rec.incidents) == 3
        assert rec.incidents == [v.incident_id for v in verdicts]
        assert len(run.since(t0, m.IncidentRecurring)) == 1  # once, not per occurrence
        assert run.action_calls() == ["rollback_config"] * 3  # still fixed every time
        _, out, _ = await run.cli("audit", rec.incident_id)
        assert "incident.recurring" in out and "RECURRING error_rate: 3 incidents" in out, out
        print(f"\nflapping: actions {run.action_calls()}, recurring escalated once after "
              f"{rec.count}")


# --- honest credit ---------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(170)
async def test_a_fault_that_cleared_by_itself_before_the_fix_gets_no_fix_and_no_credit(
        tmp_path: Path) -> None:
    async with running_stack(tmp_path, "approve") as run:
        t0 = time.time()
        await run.chaos("POST", "bad_config")
        [waiting] = await run.wait(lambda e: isinstance(e, m.Decision) and e.ts >= t0
                                   and e.outcome == "awaiting_approval")
        assert isinstance(waiting, m.Decision)
        eid, incident = waiting.execution_id, waiting.incident_id
        # The fault goes away by itself while the fix waits for a human, and the
        # detector resolves the incident.
        await run.chaos("DELETE", "bad_config")
        await run.wait(lambda e: isinstance(e, m.IncidentResolved)
                       and e.incident_id == incident, timeout=60)
        # A human approves late: the step must not run on a healthy subject.
        code, _, err = await run.cli("approve", eid, "--by", "alice")
        assert code == 0, err
        [result] = await run.wait(lambda e: isinstance(e, m.ExecutionResult)
                                  and e.execution_id == eid)
        assert isinstance(result, m.ExecutionResult)
        assert result.status == "skipped", result
        assert "was resolved by the detector" in result.detail
        assert run.action_calls() == []
        credited = [e for e in run.col.events(m.Verdict)
                    if e.incident_id == incident and e.recovered == "after"]
        assert credited == [], "a fix that never ran was credited"
