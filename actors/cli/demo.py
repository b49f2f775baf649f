"""`menders demo`: the whole crew against a managed subject's faults.

Starts the stack on the embedded default (bundled nats-server, the subject(s),
every actor as its own process) in a fresh state directory, waits for a
healthy baseline, injects each fault of the subject's catalog
(subjects/<kind>/faults.py) through the chaos port (which only this module
knows; no actor is given it), prints a live timeline, and ends with a
table. Exit status 1 if a fixable fault was not remediated or an unfixable
one was not escalated.

`--subject` picks the subject: webshop (the default, and what `menders demo`
alone runs), ratelimiter (three limiter nodes on a real redis-server primary
and replica), kvcluster (three real etcd members), or all. `all` is one crew
and one config holding the three subjects, all started by the stack at once
(the mix `menders up` manages); their catalogs run one fault at a time, one
subject after another, so every row is one fault's story while the other two
subjects stay under their own load and must stay quiet, and one table is
printed per subject.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp

from actors.runtime.config import Config, LlmConfig
from actors.stack.natsserver import free_port
from actors.stack.up import Stack, StackError
from bus_schemas import catalog, codec, render
from bus_schemas import messages as m
from subjects.kvcluster.faults import FAULTS as KVCLUSTER_FAULTS
from subjects.ratelimiter.faults import FAULTS as RATELIMITER_FAULTS
from subjects.webshop.faults import FAULTS

SUBJECT = "webshop"  # the default subject, and its name in the demo's config
FAULT_DEADLINE_S = 40.0  # per fault: detection, diagnosis, fix and verification
SETTLE_DEADLINE_S = 25.0  # back to a healthy baseline between faults
KV_PORTS = 7  # an embedded etcd cluster: three client/peer pairs from the base, load at +6


class FaultSpec(Protocol):
    """What the demo needs of a catalog entry (each kind's faults.py has its own class)."""

    @property
    def name(self) -> str: ...
    @property
    def fixable(self) -> bool: ...
    @property
    def description(self) -> str: ...


@dataclass(frozen=True)
class DemoSubject:
    """One subject of the demo: its kind (also its name in the config) and its catalog."""

    kind: str
    faults: tuple[FaultSpec, ...]
    fault_deadline_s: float = FAULT_DEADLINE_S
    settle_deadline_s: float = SETTLE_DEADLINE_S
    baseline_s: float = 30.0  # the first healthy baseline, from a cold start


# Deadlines measured on 2 shared cores: a restarted etcd member or redis-server takes
# seconds to rejoin, and the verifier wants a stable window on top. kvcluster settles
# for up to a minute: a slow machine's elections may open leader_churn, whose count
# covers the last minute (subjects.kvcluster.observer.CHURN_WINDOW_S).
SUBJECTS: dict[str, DemoSubject] = {
    "webshop": DemoSubject("webshop", FAULTS),
    "ratelimiter": DemoSubject("ratelimiter", RATELIMITER_FAULTS, 45.0, 30.0, 45.0),
    "kvcluster": DemoSubject("kvcluster", KVCLUSTER_FAULTS, 60.0, 65.0, 60.0),
}
CHOICES = (*SUBJECTS, "all")


@dataclass
class Row:
    fault: FaultSpec
    subject: str = SUBJECT
    detected_after: float | None = None
    diagnosis: str = ""
    actions: list[str] = field(default_factory=list)
    verified_after: float | None = None
    outcome: str = "not detected"
    source: str = ""  # the first diagnosis's: runbook, claude, claude->runbook
    elapsed_s: float = 0.0  # from the injection to the end of the fault's wait
    started_at: float = 0.0  # wall clock of the injection

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
        self.last_of: dict[str, m.Observation] = {}

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
            self.last_of[event.subject] = event
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

    def since(self, t0: float, subject: str = SUBJECT) -> list[m.Event]:
        return [e for e in self.events if e.ts >= t0 and e.subject == subject]

    def open_incidents(self, subject: str | None = None) -> set[str]:
        """Open incidents, of one subject or of all."""
        opened: set[str] = set()
        for e in self.events:
            if subject is not None and e.subject != subject:
                continue
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
                llm: LlmConfig | None = None, ports: dict[str, int] | None = None) -> str:
    """The demo's config; `ports` (kind -> its url's port) overrides the webshop alone."""
    body = subjects_body(home, ports or {SUBJECT: service_port}, nats_port, metrics_base)
    return body + ("\n" + llm_section(llm) if llm is not None else "")


def demo_body(home: Path, service_port: int, nats_port: int, metrics_base: int,
              mode: str = "execute") -> str:
    return subjects_body(home, {SUBJECT: service_port}, nats_port, metrics_base, mode)


def subject_section(home: Path, kind: str, port: int) -> str:
    """One subject, named after its kind, embedded (started by the stack) on `port`."""
    kind_line = "" if kind == "webshop" else f'kind = "{kind}"\n'
    text = (f"\n[subjects.{kind}]\n{kind_line}url = \"http://127.0.0.1:{port}\"\n"
            "scrape_interval_s = 1.0\n")
    if kind == "kvcluster":
        # The executor builds its action client from the SubjectConfig, which does not
        # know the embedded subject's state dir (<home>/subjects/<name>): say it here.
        text += f'\n[subjects.{kind}.options]\ncluster_dir = "{home / "subjects" / kind}"\n'
    return text


def subjects_body(home: Path, ports: dict[str, int], nats_port: int, metrics_base: int,
                  mode: str = "execute") -> str:
    allow = ", ".join(f'{kind} = ["*"]' for kind in ports)
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
allow = {{ {allow} }}
approval_above = "medium"
max_per_subject_per_minute = 20
max_per_minute = 40

[verifier]
stable_window_s = 3.0
deadline_s = 20.0
""" + "".join(subject_section(home, kind, port) for kind, port in ports.items())


def free_port_block(start: int, count: int) -> int:
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


async def chaos_request(session: aiohttp.ClientSession, base: str, method: str, fault: str,
                 tries: int = 1) -> None:
    """Inject (POST) or clear (DELETE) a fault; a clear is the harness's repair and is
    tried again on a server error (its first try may meet a connection the fault broke)."""
    for attempt in range(1, tries + 1):
        # Generous: clearing a lost quorum rebuilds three etcd members.
        async with session.request(method, f"{base}/faults/{fault}",
                                   timeout=aiohttp.ClientTimeout(total=60)) as resp:
            if resp.status < 400:
                return
            if resp.status < 500 or attempt == tries:
                raise StackError(f"chaos {method} {fault}: HTTP {resp.status} "
                                 f"{(await resp.text())[:300]}")
        await asyncio.sleep(1.0)


async def _wait_baseline(tl: Timeline, timeout: float, subject: str = SUBJECT) -> bool:
    """A healthy baseline: observations flowing, the subject up, none of its incidents open."""
    deadline = time.monotonic() + timeout
    healthy_since: float | None = None
    while time.monotonic() < deadline:
        obs = tl.last_of.get(subject)
        fine = obs is not None and obs.up and not tl.open_incidents(subject)
        if fine:
            healthy_since = healthy_since or time.monotonic()
            if time.monotonic() - healthy_since >= 3.0:
                return True
        else:
            healthy_since = None
        await tl.wait(0.5)
    return False


def opened_since(events: list[m.Event]) -> list[m.Event]:
    """The events of the incidents that opened within `events`: an incident still open
    from an earlier fault (a slow machine's unsettled aftermath) may escalate or be
    acted on during this one, and must not be taken for this fault's."""
    incidents = {e.incident_id for e in events if isinstance(e, m.IncidentOpened)}
    return [e for e in events if e.incident_id in incidents]


def _summarize(row: Row, events: list[m.Event], t0: float) -> None:
    events = opened_since(events)
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
                     chaos: str, subject: DemoSubject | None = None,
                     rows: list[Row] | None = None,
                     approve: Callable[[m.HumanApproval], Awaitable[None]] | None = None
                     ) -> Row:
    """One fault's row (appended to `rows` at once, so a failed clear still reports it)."""
    subject = subject or SUBJECTS[SUBJECT]
    name = subject.kind
    row = Row(fault, name)
    if rows is not None:
        rows.append(row)
    where = "" if name == SUBJECT else f"{name}: "
    print(f"\n== fault: {where}{fault.name} ({fault.description})", flush=True)
    t0 = row.started_at = time.time()
    await chaos_request(session, chaos, "POST", fault.name)
    deadline = time.monotonic() + subject.fault_deadline_s
    try:
        while time.monotonic() < deadline:
            everything = tl.since(t0, name)
            events = opened_since(everything)
            incidents = {e.incident_id for e in events if isinstance(e, m.IncidentOpened)}
            settled = incidents and not (incidents & tl.open_incidents(name))
            escalated = any(isinstance(e, m.IncidentEscalated) for e in events)
            if (settled and not verdicts_pending(events)) or (escalated and not fault.fixable):
                break
            if approve is not None:  # an earlier incident's step too: a human would
                for ap in to_approve(fault, everything):
                    print(f"   ({ON_CALL}: menders approve {ap.execution_id})", flush=True)
                    await approve(ap)
            await tl.wait(0.5)
    finally:
        _summarize(row, tl.since(t0, name), t0)
        row.elapsed_s = time.time() - t0
        # Reset hidden state (a human fixes the upstream), then wait for health.
        await chaos_request(session, chaos, "DELETE", fault.name, tries=3)
    if not await _wait_baseline(tl, subject.settle_deadline_s, name):
        print(f"   (baseline not healthy again within {subject.settle_deadline_s:g}s)",
              flush=True)
    return row


def verdicts_pending(events: list[m.Event]) -> bool:
    """A plan that succeeded whose verdict has not arrived yet (it may trail the
    resolution)."""
    judged = {e.plan_id for e in events if isinstance(e, m.Verdict)}
    return any(isinstance(e, m.PlanEnded) and e.outcome == "succeeded"
               and e.plan_id not in judged for e in events)


ON_CALL = "demo-oncall"


def to_approve(fault: FaultSpec, events: list[m.Event]) -> list[m.HumanApproval]:
    """The demo's on-call human: approve the steps of `fault.human_approves` actions the
    governor holds for a human, once each; the governor still judges them on release."""
    actions: tuple[str, ...] = getattr(fault, "human_approves", ())  # not every catalog has it
    return approvals_for(actions, fault.name, events)


def approvals_for(actions: tuple[str, ...], why: str,
                  events: list[m.Event]) -> list[m.HumanApproval]:
    """HumanApprovals for the held steps of `actions` not answered yet, once each."""
    asked = [e for e in events if isinstance(e, m.Decision)
             and e.outcome == "awaiting_approval" and e.step is not None
             and e.step.action in actions]
    answered = {e.execution_id for e in events if isinstance(e, m.HumanApproval)}
    return [m.HumanApproval(execution_id=d.execution_id, approved=True, by=ON_CALL,
                            reason=f"demo: {why} needs {d.step.action}",
                            incident_id=d.incident_id, subject=d.subject)
            for d in asked if d.step is not None and d.execution_id not in answered]


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


def chosen(args: argparse.Namespace) -> tuple[DemoSubject, ...]:
    which = getattr(args, "subject", None) or SUBJECT
    if which == "all":
        return tuple(SUBJECTS.values())
    if which not in SUBJECTS:
        raise StackError(f"unknown subject {which!r}; known: {', '.join(CHOICES)}")
    return (SUBJECTS[which],)


def with_faults(picked: tuple[DemoSubject, ...],
                names: list[str] | None) -> tuple[DemoSubject, ...] | str:
    """The subjects with only the named faults (those with none left are dropped), or
    the error to print when a name is in no chosen subject's catalog."""
    if not names:
        return picked
    known = {f.name for d in picked for f in d.faults}
    unknown = [f for f in names if f not in known]
    if unknown:
        return f"unknown fault(s) {unknown}; known: {', '.join(sorted(known))}"
    kept = []
    for d in picked:
        by_name = {f.name: f for f in d.faults}
        faults = tuple(by_name[n] for n in names if n in by_name)
        if faults:
            kept.append(DemoSubject(d.kind, faults, d.fault_deadline_s, d.settle_deadline_s,
                                    d.baseline_s))
    return tuple(kept)


def ports_for(picked: tuple[DemoSubject, ...]) -> dict[str, int]:
    ports = {}
    for d in picked:
        if d.kind == "kvcluster":
            base = free_port_block(free_port(), KV_PORTS) or free_port_block(20000, KV_PORTS)
            if not base:
                raise StackError(f"no {KV_PORTS} consecutive free ports for the etcd members")
            ports[d.kind] = base
        else:
            ports[d.kind] = free_port()
    return ports


async def run_demo(config: Config, args: argparse.Namespace) -> int:
    try:
        picked = with_faults(chosen(args), args.fault)
    except StackError as exc:
        print(f"menders demo: {exc}", file=sys.stderr)
        return 2
    if isinstance(picked, str):
        print(picked, file=sys.stderr)
        return 2
    use_llm = _llm_banner(config.llm, args.llm)
    home = Path(tempfile.mkdtemp(prefix="menders-demo-"))
    cfg_path = home / "menders.toml"
    ports = None if [d.kind for d in picked] == [SUBJECT] else ports_for(picked)
    cfg_path.write_text(demo_config(home, free_port(), free_port(),
                                    free_port_block(9464, len(catalog.ACTORS)),
                                    config.llm if use_llm else None, ports))
    from actors.runtime.config import load

    demo_cfg = load(cfg_path)
    stack = Stack(demo_cfg, str(cfg_path), child_logs=True)
    started = time.monotonic()
    rows: list[Row] = []
    stack_events: list[m.Event] = []
    print(f"menders demo: state in {home}", flush=True)
    try:
        await stack.start()
        ready = await stack.wait_ready()
        print(f"menders demo: {len(stack.actors)} actors ready in "
              f"{time.monotonic() - started:.1f}s (heartbeats after {ready:.1f}s)", flush=True)
        stack_events = await _drive(stack, picked, args.quiet, rows)
    except StackError as exc:
        print(f"menders demo: {exc}", file=sys.stderr)
        failure = True
    else:
        failure = False
    finally:
        await stack.stop()
    for d in picked:
        if len(picked) > 1:
            print(f"\n== {d.kind}", flush=True)
        print_table([r for r in rows if r.subject == d.kind])
    if len(picked) > 1:
        _print_strays(rows, stack_events)
    sources = sorted({r.source for r in rows if r.source})
    if sources:
        counts = ", ".join(f"{src} {sum(r.source == src for r in rows)}" for src in sources)
        print(f"\ndiagnoses by source: {counts}", flush=True)
        if use_llm and "claude->runbook" in sources:
            print("  (claude->runbook: Claude could not answer; the diagnosis says why)",
                  flush=True)
    failed = [r for r in rows if not r.ok]
    elapsed = time.monotonic() - started
    verdict = (f"{len(failed)} fault(s) NOT handled as expected" if failed
               else "stopped early" if failure or not rows
               else "every fault handled as expected")
    print(f"\nmenders demo: {verdict} in {elapsed:.0f}s; record: "
          f"MENDERS_HOME={home} menders audit", flush=True)
    return 0 if not failed and rows and not failure else 1


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


def _print_strays(rows: list[Row], events: list[m.Event]) -> None:
    """Incidents opened on a subject while a fault ran on another one: noise to explain."""
    strays: dict[str, list[str]] = {}
    for row in rows:
        end = row.started_at + row.elapsed_s
        for e in events:
            if (isinstance(e, m.IncidentOpened) and e.subject != row.subject
                    and row.started_at <= e.ts <= end):
                strays.setdefault(e.subject, []).append(f"{e.invariant} during {row.fault.name}")
    if not strays:
        print("\nsubjects not under fault stayed quiet", flush=True)
        return
    print("\nincidents on subjects not under fault:", flush=True)
    for subject, what in strays.items():
        print(f"  {subject}: {', '.join(what)}", flush=True)


async def _drive(stack: Stack, picked: tuple[DemoSubject, ...], quiet: bool,
                 rows: list[Row]) -> list[m.Event]:
    """Run each subject's faults, appending to `rows` as they end (kept on an error);
    every lifecycle event seen, for the closing notes."""
    import nats

    from actors.cli import operator
    from bus_schemas.natsconf import inbox_prefix, servers

    tl = Timeline(quiet)
    nc = await nats.connect(servers(stack.url), user=catalog.OPERATOR,
                            password=stack.passwords[catalog.OPERATOR],
                            inbox_prefix=inbox_prefix(catalog.OPERATOR))
    try:
        await nc.subscribe(catalog.EVERYTHING, cb=tl.on_msg)
        for d in picked:
            if not await _wait_baseline(tl, d.baseline_s, d.kind):
                what = "the demo subject" if d.kind == SUBJECT else d.kind
                raise StackError(f"{what} never reached a healthy baseline")
        print("menders demo: healthy baseline", flush=True)
        async with aiohttp.ClientSession() as session:
            for i, d in enumerate(picked):
                chaos = stack.chaos[d.kind]
                # The subject before it may have disturbed it (two cores, shared).
                if i and not await _wait_baseline(tl, d.settle_deadline_s, d.kind):
                    print(f"   ({d.kind}: baseline not healthy within "
                          f"{d.settle_deadline_s:g}s)", flush=True)
                for fault in d.faults:
                    await _run_fault(fault, tl, session, chaos, d, rows,
                                     lambda ap: operator.publish(nc, ap))
        return tl.events
    finally:
        await nc.close()


def add_arguments(sp: argparse.ArgumentParser) -> None:
    """`menders demo`'s flags (actors/cli/main.py registers them on its subparser)."""
    sp.add_argument("--subject", choices=CHOICES, default=SUBJECT,
                    help=f"which subject's fault catalog to run (default {SUBJECT}; all: "
                         "the three in one crew, one fault at a time)")
    sp.add_argument("--fault", action="append", help="run only this fault (repeatable)")
    sp.add_argument("--llm", action="store_true", help="diagnose with Claude (needs a key)")
    sp.add_argument("--quiet", action="store_true", help="no live timeline, only the table")


def main(argv: list[str] | None = None) -> int:
    """`python -m actors.cli.demo [--config F] [flags]`: the same run as `menders demo`."""
    from actors.runtime.config import load

    parser = argparse.ArgumentParser(prog="menders demo")
    parser.add_argument("--config", help="TOML config file (its [llm] section is used)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run_demo(load(args.config), args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
