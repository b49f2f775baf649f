"""`menders demo`: the whole crew against the demo subject's faults.

Starts the stack on the embedded default (bundled nats-server, the webshop,
every actor as its own process) in a fresh state directory, waits for a
healthy baseline, injects each fault of the webshop's catalog
(subjects/webshop/faults.py) through the chaos port (which only this module
knows; no actor is given it), prints a live timeline, and ends with a
table. Exit status 1 if a fixable fault was not remediated or the unfixable
one was not escalated.

`--llm` diagnoses with Claude when ANTHROPIC_API_KEY is set (the `[llm]`
section of the user's config, e.g. its base_url, carries over into the demo's
config) and says plainly when it cannot; without `--llm` the key is withheld
from the crew, so the runbooks diagnose. The closing line counts diagnoses by
source, so a Claude outage (source claude->runbook) is visible too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from actors.runtime.config import Config, LlmConfig
from actors.stack.natsserver import free_port
from actors.stack.up import Stack, StackError
from bus_schemas import catalog, codec, render
from bus_schemas import messages as m
from subjects.webshop.faults import FAULTS, FaultSpec

SUBJECT = "webshop"
FAULT_DEADLINE_S = 40.0  # per fault: detection, diagnosis, fix and verification
SETTLE_DEADLINE_S = 25.0  # back to a healthy baseline between faults


@dataclass
class Row:
    fault: FaultSpec
    detected_after: float | None = None
    diagnosis: str = ""
    actions: list[str] = field(default_factory=list)
    verified_after: float | None = None
    outcome: str = "not detected"
    source: str = ""  # the first diagnosis's: runbook, claude, claude->runbook

    @property
    def ok(self) -> bool:
        expected = "remediated" if self.fault.fixable else "escalated"
        return self.outcome == expected


class Timeline:
    """Every lifecycle event on the bus, printed as it arrives, kept for the table."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.events: list[m.Event] = []
        self.changed = asyncio.Event()
        self.observations = 0
        self.last_observation: m.Observation | None = None

    async def on_msg(self, msg: object) -> None:
        data: bytes = msg.data  # type: ignore[attr-defined]
        try:
            event = codec.decode(data)
        except codec.DecodeError:
            return
        if isinstance(event, m.Heartbeat):
            return
        if isinstance(event, m.Observation):
            self.observations += 1
            self.last_observation = event
            self.changed.set()
            return
        self.events.append(event)
        if not self.quiet:
            print("  " + render.line(event, msg.subject), flush=True)  # type: ignore[attr-defined]
        self.changed.set()

    async def wait(self, timeout: float) -> None:
        self.changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)

    def since(self, t0: float) -> list[m.Event]:
        return [e for e in self.events if e.ts >= t0 and e.subject == SUBJECT]

    def open_incidents(self) -> set[str]:
        opened: set[str] = set()
        for e in self.events:
            if isinstance(e, m.IncidentOpened):
                opened.add(e.incident_id)
            elif isinstance(e, m.IncidentResolved | m.IncidentEscalated):
                opened.discard(e.incident_id)
            elif isinstance(e, m.Verdict) and e.passed:
                opened.discard(e.incident_id)
        return opened


def llm_section(llm: LlmConfig) -> str:
    """The user's [llm] settings, as TOML for the demo's own config."""
    lines = ["[llm]"]
    for name in llm.__struct_fields__:
        value = getattr(llm, name)
        lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def demo_config(home: Path, service_port: int, nats_port: int, metrics_base: int,
                llm: LlmConfig | None = None) -> str:
    return demo_body(home, service_port, nats_port, metrics_base) + (
        "\n" + llm_section(llm) if llm is not None else "")


def demo_body(home: Path, service_port: int, nats_port: int, metrics_base: int,
              mode: str = "execute") -> str:
    return f"""\
home = "{home}"

[nats]
port = {nats_port}

[runtime]
metrics_base_port = {metrics_base}

[governor]
# The defaults are closed (approve mode, nothing allowed unattended): the demo says
# what it lets the crew do on its own.
mode = "{mode}"
allow = {{ {SUBJECT} = ["*"] }}
approval_above = "medium"
max_per_subject_per_minute = 20
max_per_minute = 40

[verifier]
stable_window_s = 3.0
deadline_s = 20.0

[subjects.{SUBJECT}]
url = "http://127.0.0.1:{service_port}"
scrape_interval_s = 1.0
"""


def _free_port_block(start: int, count: int) -> int:
    """The first of `count` consecutive free ports at or after `start` (0 if none)."""
    import socket

    for base in range(start, start + 200, count):
        try:
            socks = []
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    return 0


async def _chaos(session: aiohttp.ClientSession, base: str, method: str, fault: str) -> None:
    async with session.request(method, f"{base}/faults/{fault}",
                               timeout=aiohttp.ClientTimeout(total=5)) as resp:
        if resp.status >= 400:
            raise StackError(f"chaos {method} {fault}: HTTP {resp.status} {await resp.text()}")


async def _wait_baseline(tl: Timeline, timeout: float) -> bool:
    """A healthy baseline: observations flowing, the subject up, no incident open."""
    deadline = time.monotonic() + timeout
    healthy_since: float | None = None
    while time.monotonic() < deadline:
        obs = tl.last_observation
        fine = obs is not None and obs.up and not tl.open_incidents()
        if fine:
            healthy_since = healthy_since or time.monotonic()
            if time.monotonic() - healthy_since >= 3.0:
                return True
        else:
            healthy_since = None
        await tl.wait(0.5)
    return False


def _summarize(row: Row, events: list[m.Event], t0: float) -> None:
    incidents = {e.incident_id for e in events if isinstance(e, m.IncidentOpened)}
    opened = [e for e in events if isinstance(e, m.IncidentOpened)]
    if opened:
        row.detected_after = min(e.ts for e in opened) - t0
    diagnoses = [e for e in events if isinstance(e, m.Diagnosis)]
    if diagnoses:
        row.diagnosis = diagnoses[0].hypothesis
        row.source = diagnoses[0].source
    row.actions = [f"{e.action}:{e.status}" for e in events if isinstance(e, m.ExecutionResult)]
    passed = [e for e in events if isinstance(e, m.Verdict) and e.passed]
    if passed:
        row.verified_after = min(e.ts for e in passed) - t0
    escalated = {e.incident_id for e in events if isinstance(e, m.IncidentEscalated)}
    closed = {e.incident_id for e in events
              if isinstance(e, m.IncidentResolved) or (isinstance(e, m.Verdict) and e.passed)}
    if not incidents:
        row.outcome = "not detected"
    elif escalated:
        row.outcome = "escalated"
    elif passed and incidents <= closed:
        row.outcome = "remediated"
    elif incidents <= closed:
        row.outcome = "resolved by itself"
    else:
        row.outcome = "unresolved"


async def _run_fault(fault: FaultSpec, tl: Timeline, session: aiohttp.ClientSession,
                     chaos: str) -> Row:
    row = Row(fault)
    print(f"\n== fault: {fault.name} ({fault.description})", flush=True)
    t0 = time.time()
    await _chaos(session, chaos, "POST", fault.name)
    deadline = time.monotonic() + FAULT_DEADLINE_S
    try:
        while time.monotonic() < deadline:
            events = tl.since(t0)
            incidents = {e.incident_id for e in events if isinstance(e, m.IncidentOpened)}
            settled = incidents and not (incidents & tl.open_incidents())
            escalated = any(isinstance(e, m.IncidentEscalated) for e in events)
            if (settled and not _verdicts_pending(events)) or (escalated and not fault.fixable):
                break
            await tl.wait(0.5)
    finally:
        _summarize(row, tl.since(t0), t0)
        # Reset hidden state (a human fixes the upstream), then wait for health.
        await _chaos(session, chaos, "DELETE", fault.name)
    if not await _wait_baseline(tl, SETTLE_DEADLINE_S):
        print(f"   (baseline not healthy again within {SETTLE_DEADLINE_S:g}s)", flush=True)
    return row


def _verdicts_pending(events: list[m.Event]) -> bool:
    """A succeeded execution whose verdict has not arrived yet (it may trail the resolution)."""
    judged = {e.plan_id for e in events if isinstance(e, m.Verdict)}
    return any(isinstance(e, m.ExecutionResult) and e.status == "succeeded"
               and e.plan_id not in judged for e in events)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def print_table(rows: list[Row]) -> None:
    header = ("fault", "detected after", "diagnosis", "actions taken", "verified after",
              "outcome")
    table = [header] + [
        (r.fault.name, _fmt(r.detected_after), r.diagnosis[:48] or "-",
         ", ".join(r.actions) or "-", _fmt(r.verified_after),
         r.outcome + ("" if r.ok else "  <-- UNEXPECTED"))
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    print()
    for i, row in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


async def run_demo(config: Config, args: argparse.Namespace) -> int:
    faults = FAULTS
    if args.fault:
        known = {f.name: f for f in FAULTS}
        unknown = [f for f in args.fault if f not in known]
        if unknown:
            print(f"unknown fault(s) {unknown}; known: {', '.join(known)}", file=sys.stderr)
            return 2
        faults = tuple(known[f] for f in args.fault)
    use_llm = _llm_banner(config.llm, args.llm)
    home = Path(tempfile.mkdtemp(prefix="menders-demo-"))
    cfg_path = home / "menders.toml"
    cfg_path.write_text(demo_config(home, free_port(), free_port(),
                                    _free_port_block(9464, len(catalog.ACTORS)),
                                    config.llm if use_llm else None))
    from actors.runtime.config import load

    demo_cfg = load(cfg_path)
    stack = Stack(demo_cfg, str(cfg_path), child_logs=True)
    started = time.monotonic()
    rows: list[Row] = []
    print(f"menders demo: state in {home}", flush=True)
    try:
        await stack.start()
        ready = await stack.wait_ready()
        print(f"menders demo: {len(stack.actors)} actors ready in "
              f"{time.monotonic() - started:.1f}s (heartbeats after {ready:.1f}s)", flush=True)
        rows = await _drive(stack, faults, args.quiet)
    except StackError as exc:
        print(f"menders demo: {exc}", file=sys.stderr)
        return 1
    finally:
        await stack.stop()
    print_table(rows)
    sources = sorted({r.source for r in rows if r.source})
    if sources:
        counts = ", ".join(f"{src} {sum(r.source == src for r in rows)}" for src in sources)
        print(f"\ndiagnoses by source: {counts}", flush=True)
        if use_llm and "claude->runbook" in sources:
            print("  (claude->runbook: Claude could not answer; the diagnosis says why)",
                  flush=True)
    failed = [r for r in rows if not r.ok]
    elapsed = time.monotonic() - started
    verdict = ("every fault handled as expected" if not failed
               else f"{len(failed)} fault(s) NOT handled as expected")
    print(f"\nmenders demo: {verdict} in {elapsed:.0f}s; record: "
          f"MENDERS_HOME={home} menders audit", flush=True)
    return 0 if not failed and rows else 1


def _llm_banner(llm: LlmConfig, wanted: bool) -> bool:
    """Whether the crew may use Claude; says so either way."""
    if not wanted:
        # The crew inherits this environment: without --llm, no key reaches it.
        os.environ.pop("ANTHROPIC_API_KEY", None)
        return False
    if not os.environ.get("ANTHROPIC_API_KEY"):
        print("--llm: cannot use Claude: ANTHROPIC_API_KEY is not set, so the diagnoser "
              "uses its runbooks", flush=True)
        return False
    where = llm.base_url or os.environ.get("ANTHROPIC_BASE_URL") or "the Anthropic API"
    print(f"--llm: diagnosing with Claude ({llm.model} at {where}); summaries by "
          f"{llm.summary_model}; the runbooks answer if the API cannot", flush=True)
    return True


async def _drive(stack: Stack, faults: tuple[FaultSpec, ...], quiet: bool) -> list[Row]:
    import nats

    from bus_schemas.natsconf import inbox_prefix

    tl = Timeline(quiet)
    nc = await nats.connect(stack.url, user=catalog.OPERATOR,
                            password=stack.passwords[catalog.OPERATOR],
                            inbox_prefix=inbox_prefix(catalog.OPERATOR))
    try:
        await nc.subscribe(catalog.EVERYTHING, cb=tl.on_msg)
        if not await _wait_baseline(tl, 30.0):
            raise StackError("the demo subject never reached a healthy baseline")
        print("menders demo: healthy baseline", flush=True)
        chaos = stack.chaos[SUBJECT]
        rows = []
        async with aiohttp.ClientSession() as session:
            for fault in faults:
                rows.append(await _run_fault(fault, tl, session, chaos))
        return rows
    finally:
        await nc.close()
