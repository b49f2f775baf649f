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
async def running_stack(tmp_path: Path, mode: str) -> AsyncIterator[Running]:
    require_nats_server()
    home = tmp_path / "home"
    home.mkdir()
    cfg = tmp_path / "menders.toml"
    cfg.write_text(stack_config(home, mode))
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
async def test_observe_mode_executes_nothing_then_execute_mode_remediates(
        tmp_path: Path) -> None:
    async with running_stack(tmp_path, "execute") as run:
        code, out, err = await run.cli("mode", "observe", "--reason", "change freeze")
        assert (code, out.strip()) == (0, "mode is now observe"), err

        t0 = time.time()
        await run.chaos("POST", "bad_config")
        vetoes = await run.wait(lambda e: isinstance(e, m.Decision) and e.ts >= t0
                                and e.outcome == "vetoed")
        incident = vetoes[0].incident_id
        assert "observe" in vetoes[0].reason  # type: ignore[attr-defined]
        # Every alternative is vetoed the same way until the planner hands it to a human.
        [esc] = await run.wait(lambda e: isinstance(e, m.IncidentEscalated)
                               and e.incident_id == incident)
        decisions = [e for e in run.since(t0, m.Decision) if e.incident_id == incident]
        assert decisions and all(d.outcome == "vetoed" and "observe" in d.reason  # type: ignore[attr-defined]
                                 for d in decisions)
        assert run.since(t0, EXEC_KINDS) == []
        assert run.action_calls() == []
        assert isinstance(esc, m.IncidentEscalated)

        await run.chaos("DELETE", "bad_config")
        await run.baseline()
        assert run.since(t0, EXEC_KINDS) == [] and run.action_calls() == []

        code, out, err = await run.cli("mode", "execute")
        assert (code, out.strip()) == (0, "mode is now execute"), err
        t1 = time.time()
        verdict = await run.remediated_after(t1, "bad_config")
        results = [e for e in run.since(t1, m.ExecutionResult)
                   if e.incident_id == verdict.incident_id]
        assert [r.status for r in results] == ["succeeded"]  # type: ignore[attr-defined]
        assert "rollback_config" in run.action_calls()


# --- d) the kill switch -----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(170)
async def test_kill_switch_stops_remediation_until_resume(tmp_path: Path) -> None:
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
        await run.wait(lambda e: isinstance(e, m.IncidentEscalated)
                       and e.incident_id == incident)
        # Nothing was started, and anything an executor saw was refused (skipped).
        assert not run.since(t0, (m.ExecutionApproved, m.ExecutionStarted))
        assert all(r.status == "skipped" for r in run.since(t0, m.ExecutionResult))  # type: ignore[attr-defined]
        assert run.action_calls() == []

        code, out, err = await run.cli("resume", "--by", "bob")
        assert (code, out.strip()) == (0, "kill switch released"), err
        code, out, _ = await run.cli("status")
        assert "kill switch: released" in out

        await run.chaos("DELETE", "bad_config")
        await run.baseline()
        t1 = time.time()
        verdict = await run.remediated_after(t1, "bad_config")
        assert verdict.passed
        assert [r.status for r in run.since(t1, m.ExecutionResult)  # type: ignore[attr-defined]
                if r.incident_id == verdict.incident_id] == ["succeeded"]
        assert "rollback_config" in run.action_calls()
