"""Running a campaign: one stack per (subject, variant), every trial on it in turn.

A stack is `menders up`'s (bundled nats-server, the embedded subject, every actor as
its own process), or, for the baseline, the subject alone. Before each trial the harness
waits until the oracle has said healthy for `HEALTHY_FOR_S` (and, with a crew, no
incident of the subject is open); it runs the scenario's chaos steps on time, reads the
oracle every `ORACLE_EVERY_S`, collects the subject's lifecycle events from the bus,
and ends the trial when its answer is in (or at the limit). Then it resets: every fault
still injected is cleared, the kill switch released. Each trial is appended to
`trials.jsonl` as it ends, so a crash loses nothing already measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import msgspec

from actors.cli import demo
from actors.cli.eval import scoring
from actors.cli.eval.records import Mark, Trial, encode
from actors.cli.eval.scenarios import Campaign, Scenario, Variant
from actors.runtime.config import Config, LlmConfig, load
from actors.stack.natsserver import free_port
from actors.stack.up import Stack, StackError
from bus_schemas import catalog
from bus_schemas import messages as m

ORACLE_EVERY_S = 0.5
ORACLE_TIMEOUT_S = 2.0
HEALTHY_FOR_S = 3.0
NOTHING_GRACE_S = 2.0  # a scenario that wants nothing: watched this long after its steps
BASELINE_ESCALATE_WATCH_S = 10.0  # no crew cannot escalate: a short look, for its oracle


@dataclass
class Oracle:
    url: str
    session: aiohttp.ClientSession

    async def read(self) -> tuple[bool, str, dict[str, int]]:
        """(healthy, why not, effects so far); a subject that does not answer is broken."""
        try:
            async with self.session.get(f"{self.url}/oracle", timeout=aiohttp.ClientTimeout(
                    total=ORACLE_TIMEOUT_S)) as resp:
                body: Any = await resp.json(content_type=None)
            healthy = bool(body["healthy"])
            failing = [str(f) for f in body.get("failing", [])]
            effects = {str(k): int(v) for k, v in dict(body.get("effects", {})).items()}
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            return False, f"oracle unreadable: {type(exc).__name__}: {exc}"[:200], {}
        return healthy, "; ".join(failing), effects


@dataclass
class Env:
    """One running stack for one (subject, variant)."""

    kind: str
    variant: Variant
    stack: Stack
    tl: demo.Timeline
    nc: Any  # the operator's NATS connection
    oracle: Oracle
    session: aiohttp.ClientSession
    injected: set[str] = field(default_factory=set)
    killed: bool = False

    @property
    def chaos(self) -> str:
        return self.stack.chaos[self.kind]

    async def wait_healthy(self, timeout: float) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout
        since: float | None = None
        why = ""
        while time.monotonic() < deadline:
            ok, why, _ = await self.oracle.read()
            # Every incident resolved, escalated ones too: one still open at the detector
            # would swallow the next trial's fault (updated, never opened again).
            if ok and (not self.variant.crew
                       or not scoring.unresolved(self.tl.since(0.0, self.kind))):
                since = since or time.monotonic()
                if time.monotonic() - since >= HEALTHY_FOR_S:
                    return True, ""
            else:
                since = None
                why = why or "incidents still open"
            await asyncio.sleep(ORACLE_EVERY_S)
        return False, why

    async def step(self, mark: Mark) -> None:
        from actors.cli import operator

        if mark.kind == "inject":
            await demo.chaos_request(self.session, self.chaos, "POST", mark.label)
            self.injected.add(mark.label)
        elif mark.kind == "clear":
            await demo.chaos_request(self.session, self.chaos, "DELETE", mark.label, tries=3)
            self.injected.discard(mark.label)
        elif mark.kind == "kill" and self.variant.crew:
            await operator.engage_kill(self.nc, "menders-eval", "scenario step")
            self.killed = True
        elif mark.kind == "resume" and self.variant.crew:
            await self.resume()

    async def resume(self) -> None:
        from actors.cli import operator

        await operator.publish(self.nc, m.ControlCommand(command="resume", by="menders-eval",
                                                         reason="scenario step"))
        self.killed = False

    async def reset(self) -> None:
        for fault in sorted(self.injected):
            await demo.chaos_request(self.session, self.chaos, "DELETE", fault, tries=3)
        self.injected.clear()
        if self.killed:
            await self.resume()


def _config(home: Path, kind: str, variant: Variant, llm: LlmConfig,
            sync_always: bool = False) -> str:
    ports = demo.ports_for((demo.SUBJECTS[kind],))
    body = demo.subjects_body(home, ports, free_port(),
                              demo.free_port_block(9464, len(catalog.ACTORS)))
    if sync_always:  # bench/soak.py's durability run
        body = body.replace("[nats]\n", "[nats]\nsync_always = true\n", 1)
    if variant.governor:  # a TOML key is set once: the variant's replace the eval's own
        head, _, rest = body.partition("[governor]\n")
        section, sep, after = rest.partition("\n[")
        extra = "".join(f"{k} = {msgspec.json.encode(v).decode()}\n"
                        for k, v in variant.governor.items())
        body = head + "[governor]\n" + extra + _drop_keys(section, variant.governor) + sep + after
    if variant.diagnoser != "runbook":
        body += "\n" + demo.llm_section(llm)
    return body


def _drop_keys(section: str, keys: dict[str, object]) -> str:
    """The section without its lines for `keys`."""
    return "".join(line for line in section.splitlines(keepends=True)
                   if line.split("=", 1)[0].strip() not in keys)


@contextlib.contextmanager
def _diagnoser_env(variant: Variant, scripted_key: str) -> Iterator[None]:
    """The key the crew's processes inherit: none for the runbook variant (it would
    diagnose with Claude), the local stand-in's own for the scripted one."""
    saved = os.environ.get("ANTHROPIC_API_KEY")
    if variant.diagnoser == "runbook":
        os.environ.pop("ANTHROPIC_API_KEY", None)
    elif variant.diagnoser == "scripted":
        os.environ["ANTHROPIC_API_KEY"] = scripted_key
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ANTHROPIC_API_KEY", None)
        else:
            os.environ["ANTHROPIC_API_KEY"] = saved


@contextlib.asynccontextmanager
async def _scripted_api(kind: str, variant: Variant, llm: LlmConfig
                        ) -> AsyncIterator[tuple[LlmConfig, str]]:
    """For the scripted variant, a local Messages API the crew's Claude diagnoser calls;
    else nothing. Yields the [llm] settings and the key to give the crew."""
    if variant.diagnoser != "scripted":
        yield llm, ""
        return
    import subjects
    from actors.cli.eval.messages_api import RunbookModel, messages_api

    async with messages_api(RunbookModel(subjects.load(kind))) as api:
        yield msgspec.structs.replace(llm, base_url=api.url), api.key


@contextlib.asynccontextmanager
async def environment(kind: str, variant: Variant, base: Config,
                      sync_always: bool = False) -> AsyncIterator[Env]:
    async with _scripted_api(kind, variant, base.llm) as (llm, key):
        home = Path(tempfile.mkdtemp(prefix=f"menders-eval-{kind}-"))
        path = home / "menders.toml"
        path.write_text(_config(home, kind, variant, llm, sync_always))
        stack = Stack(load(path), str(path), actors=catalog.ACTORS if variant.crew else (),
                      child_logs=True)
        with _diagnoser_env(variant, key):
            await stack.start()  # children take their environment now, restarts included
        try:
            if variant.crew:
                await stack.wait_ready(60)
            async with _connected(kind, variant, stack) as env:
                yield env
        finally:
            await stack.stop()


@contextlib.asynccontextmanager
async def _connected(kind: str, variant: Variant, stack: Stack) -> AsyncIterator[Env]:
    """The operator's connection, watching everything, and the oracle's HTTP session."""
    import nats

    from bus_schemas.natsconf import inbox_prefix, servers

    tl = demo.Timeline(quiet=True)
    nc = await nats.connect(servers(stack.url), user=catalog.OPERATOR,
                            password=stack.passwords[catalog.OPERATOR],
                            inbox_prefix=inbox_prefix(catalog.OPERATOR))
    try:
        await nc.subscribe(catalog.EVERYTHING, cb=tl.on_msg)
        async with aiohttp.ClientSession() as session:
            env = Env(kind, variant, stack, tl, nc, Oracle(stack.chaos[kind], session),
                      session)
            try:
                yield env
            finally:
                with contextlib.suppress(Exception):
                    await env.reset()
    finally:
        await nc.close()


async def run_trial(env: Env, scenario: Scenario, trial: Trial) -> Trial:
    """One trial on a healthy subject; the harness's own failures land in Trial.error."""
    subject = demo.SUBJECTS[env.kind]
    ok, why = await env.wait_healthy(subject.settle_deadline_s + subject.baseline_s)
    if not ok:
        trial.error = f"the subject was not healthy before the trial: {why}"[:300]
        return trial
    _, _, effects0 = await env.oracle.read()
    t0 = time.time()
    trial.started_at = t0
    steps = [Mark(s.at, "inject" if s.inject else "clear" if s.clear else
                  "kill" if s.kill else "resume", s.inject or s.clear)
             for s in scenario.timed_steps()]
    done: list[Mark] = []
    readings: list[tuple[float, bool, str]] = []
    killed: list[tuple[float, float]] = []
    wants = scenario.right_answer
    last_step = max((s.t for s in steps), default=0.0)
    limit = trial.limit_s
    if wants == "nothing":
        limit = max(last_step, 0.0) + scenario.duration_s
    elif not env.variant.crew and wants == "escalate":
        limit = min(limit, BASELINE_ESCALATE_WATCH_S)
    try:
        while True:
            now = time.time() - t0
            while steps and steps[0].t <= now:
                mark = steps.pop(0)
                await env.step(mark)
                done.append(Mark(_since(t0), mark.kind, mark.label))
                if mark.kind == "kill":
                    killed.append((done[-1].t, float("inf")))
                elif mark.kind == "resume" and killed:
                    killed[-1] = (killed[-1][0], done[-1].t)
            healthy, why, _ = await env.oracle.read()
            readings.append((_since(t0), healthy, why))
            if env.variant.crew:
                for ap in demo.approvals_for(tuple(scenario.human_approves), scenario.name,
                                             env.tl.since(t0, env.kind)):
                    from actors.cli import operator

                    await operator.publish(env.nc, ap)
            last_inject = max((mk.t for mk in done if mk.kind == "inject"), default=0.0)
            if now >= limit or (not steps and _answered(env, scenario, trial, readings, t0,
                                                        last_inject)):
                break
            await asyncio.sleep(ORACLE_EVERY_S)
    finally:
        ended = _since(t0)
        with contextlib.suppress(StackError, aiohttp.ClientError, TimeoutError):
            await env.reset()
    _, _, effects1 = await env.oracle.read()
    delta = {a: n - effects0.get(a, 0) for a, n in effects1.items() if n > effects0.get(a, 0)}
    events = env.tl.since(t0, env.kind)
    seen = scoring.Observed(events=events, t0=t0, readings=readings,
                            effects=delta, steps=done, ended_at=ended, killed=killed)
    trial = scoring.score(trial, scenario, seen)
    if env.variant.crew:
        trial.audit_verified, trial.audit_missing = await audit_check(env.stack.home, events)
    return trial


AUDITED = next(c for c in catalog.CONSUMERS if c.durable == "auditor").schemas
AUDIT_WAIT_S = 5.0  # the auditor records each event moments after it is published


async def audit_check(home: Path, events: list[m.Event]) -> tuple[bool, int]:
    """(the record's chain verifies, how many of these lifecycle events it lacks): what
    the crew did must be in its record, not only on the bus."""
    from actors.auditor.store import AuditError, AuditStore, default_path

    wanted = {e.id for e in events if type(e) in AUDITED}
    deadline = time.monotonic() + AUDIT_WAIT_S
    while True:
        try:
            store = await AuditStore.open(default_path(home), readonly=True)
        except (AuditError, sqlite3.Error):  # no record at all
            return False, len(wanted)
        try:
            ids = {r.event_id async for r in store.records()}
            missing = wanted - ids
            if not missing or time.monotonic() > deadline:
                return (await store.verify()).ok, len(missing)
        finally:
            await store.close()
        await asyncio.sleep(0.25)


def _since(t0: float) -> float:
    """Seconds into the trial, as every mark, reading and its end record them. One rounding
    for all: the reading that ended a trial is never later than its end (with the end
    unrounded, half the trials ending on their deciding reading dropped it and lost)."""
    return round(time.time() - t0, 3)


def _answered(env: Env, scenario: Scenario, trial: Trial,
              readings: list[tuple[float, bool, str]], t0: float, after: float) -> bool:
    """Whether the trial's answer is in, so it can end before its limit."""
    wants = scenario.right_answer
    if wants == "nothing":
        return False  # watched for its whole duration
    events = env.tl.since(t0, env.kind)
    if wants == "escalate":
        return any(isinstance(e, m.IncidentEscalated) for e in events)
    healthy = scoring.healthy_from(readings, after, trial.settle_s, float("inf"))
    if healthy is None:
        return False
    # With a crew, also wait for its own story to end (no incident open, no verdict due),
    # so its counts are complete.
    return not env.variant.crew or (not env.tl.open_incidents(env.kind)
                                    and not demo.verdicts_pending(events))


class Progress:
    """A progress line with an ETA on stderr (one line per trial when not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.tty = sys.stderr.isatty()

    def tick(self, trial: Trial) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        width = 24
        bar = "#" * round(width * self.done / self.total)
        what = (f"{trial.subject}/{trial.scenario} {trial.variant} #{trial.repeat}: "
                f"{'won' if trial.won else 'lost'}{' (harness error)' if trial.error else ''}")
        line = (f"[{bar:<{width}}] {self.done}/{self.total} trials, {_dur(elapsed)} elapsed, "
                f"ETA {_dur(eta)}  {what}")
        print(("\r" + line[:160].ljust(160)) if self.tty else line, end="" if self.tty
              else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _dur(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


async def run(campaign: Campaign, scenarios: list[Scenario], sink: BinaryIO,
              base: Config) -> list[Trial]:
    """Every trial of the campaign, each appended to `sink` (trials.jsonl) as it ends."""
    variants = campaign.variants_by_name()
    plan = [(kind, name, variant, s, r) for kind in campaign.subjects
            for name, variant in variants.items()
            for s in scenarios if s.subject == kind
            for r in range(1, campaign.repeats + 1)]
    progress = Progress(len(plan))
    trials: list[Trial] = []
    for kind in campaign.subjects:
        for name, variant in variants.items():
            mine = [p for p in plan if p[0] == kind and p[1] == name]
            if not mine:
                continue
            async with environment(kind, variant, base) as env:
                for _, _, _, scenario, repeat in mine:
                    trial = Trial(
                        campaign=campaign.name, subject=kind, scenario=scenario.name,
                        scenario_kind=scenario.kind, variant=name, repeat=repeat,
                        expected=scenario.right_answer, cause=scenario.cause,
                        limit_s=(scenario.limit_s or campaign.limit_s
                                 or demo.SUBJECTS[kind].fault_deadline_s),
                        settle_s=campaign.settle_s)
                    trial = await run_trial(env, scenario, trial)
                    sink.write(encode(trial) + b"\n")
                    sink.flush()
                    trials.append(trial)
                    progress.tick(trial)
    progress.close()
    return trials
