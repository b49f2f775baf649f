"""The auditor as a real process on a real nats-server: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.auditor.store import AuditStore
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from tests.harness import REPO, ActorProc, Bus

pytestmark = pytest.mark.e2e

AUDITED = {m.kind_of(s) for c in catalog.consumers_of("auditor") for s in c.schemas}
Row = tuple[int, str, str, str, str, int, bytes]


def db_path(bus: Bus) -> Path:
    return bus.home / "audit.db"


def read_rows(path: Path) -> list[Row]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute("SELECT seq, event_id, kind, bus_subject, stream, stream_seq, payload "
                          "FROM events ORDER BY seq").fetchall()
    finally:
        db.close()


async def wait_rows(bus: Bus, n: int, within: float = 30.0) -> list[Row]:
    """Poll the record until it holds at least n rows (bounded)."""
    deadline = time.monotonic() + within
    while True:
        rows = read_rows(db_path(bus))
        if len(rows) >= n:
            return rows
        if time.monotonic() > deadline:
            logs = "\n".join(p.log()[-3000:] for p in bus.procs if p.name == "auditor")
            raise AssertionError(f"{len(rows)}/{n} rows after {within}s; auditor log:\n{logs}")
        await asyncio.sleep(0.1)


async def verify(bus: Bus, path: Path | None = None) -> int:
    store = await AuditStore.open(path or db_path(bus), readonly=True)
    try:
        report = await store.verify()
        assert report.ok, report
        return report.rows
    finally:
        await store.close()


async def start_auditor(bus: Bus) -> ActorProc:
    since = time.time()
    proc = bus.spawn("auditor")
    await bus.wait_heartbeat("auditor", after=since)
    return proc


def one_of_each(incident: str) -> list[tuple[str, m.Event]]:
    """(publishing user, event) for every kind the auditor consumes."""
    step = m.PlanStep(step_id="s1", action="restart_worker", params={"worker": 2})
    env: dict[str, Any] = {"incident_id": incident, "subject": "webshop"}
    events: list[tuple[str, m.Event]] = [
        ("detector", m.IncidentOpened(**env, invariant="p99_latency", summary="p99 900ms",
                                      value=900, threshold=250)),
        ("detector", m.IncidentUpdated(**env, invariant="p99_latency", value=950)),
        ("planner", m.IncidentParked(**env, invariant="p99_latency", obstacle="kill",
                                     reason="kill switch engaged", action="restart_worker")),
        ("planner", m.IncidentRecurring(**env, invariant="p99_latency", count=3,
                                        window_s=600.0, incidents=[incident])),
        ("operator", m.RetryRequested(**env, by="ana", reason="try again")),
        ("planner", m.DiagnosisRequested(**env, invariant="p99_latency",
                                         reason="ana asked for a retry", attempt=1)),
        ("diagnoser", m.Diagnosis(**env, invariant="p99_latency", hypothesis="worker stuck",
                                  confidence=0.8,
                                  actions=[m.RecommendedAction(action="restart_worker")])),
        ("planner", m.Plan(**env, plan_id="p1", invariant="p99_latency", attempt=1,
                           steps=[step])),
        ("governor", m.Decision(**env, outcome="awaiting_approval", reason="high risk",
                                plan_id="p1", execution_id="x1", step=step)),
        ("operator", m.HumanApproval(**env, execution_id="x1", approved=True, by="ana")),
        ("governor", m.ExecutionApproved(**env, execution_id="x1", plan_id="p1", step=step,
                                         approved_by="ana", not_after=2e9)),
        ("executor", m.ExecutionStarted(**env, execution_id="x1", plan_id="p1",
                                        action="restart_worker")),
        ("executor", m.ExecutionResult(**env, execution_id="x1", plan_id="p1",
                                       action="restart_worker", status="succeeded")),
        ("governor", m.PlanProgressed(**env, plan_id="p1", wave=1, waves=2, state="started",
                                      steps=["s1"])),
        ("governor", m.PlanEnded(**env, plan_id="p1", outcome="succeeded", steps=[
            m.StepEnding(step_id="s1", action="recycle_pool", ended="succeeded",
                         released=True)])),
        ("verifier", m.Verdict(**env, plan_id="p1", invariant="p99_latency", passed=True,
                               reason="held 3s")),
        ("detector", m.IncidentResolved(**env, invariant="p99_latency", reason="holds")),
        ("planner", m.IncidentEscalated(**env, invariant="p99_latency", reason="late",
                                        attempts=1)),
        ("diagnoser", m.IncidentSummary(**env, summary="p99 rose; restart fixed it",
                                        outcome="escalated", model="claude-haiku-4-5")),
        ("operator", m.ControlCommand(command="mode", mode="approve", by="ana")),
        ("governor", m.KillReengaged(reason="released without `menders resume`",
                                     found_by="mallory", found_revision=3)),
        ("governor", m.PolicyChanged(change="resume", by="ana")),
        ("executor", m.DeadLetter(actor="executor", consumer="executor",
                                  bus_subject=catalog.subject_for(m.ExecutionApproved,
                                                                subject="webshop"),
                                  stream_seq=7,
                                  deliveries=5, reason="boom", payload_bytes=2,
                                  payload_head="{}")),
    ]
    # The producer set before encoding, so the test knows the exact bytes sent.
    return [(u, msgspec.structs.replace(e, producer=u)) for u, e in events]


async def run_cli(bus: Bus, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDERS_")}
    env["MENDERS_HOME"] = str(bus.home)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors", "audit", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def backup(src: Path, dst: Path) -> None:
    """A consistent copy of a live WAL database."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


async def publisher(bus: Bus, user: str = "detector") -> Callable[[m.Event], Awaitable[None]]:
    js = (await bus.connect(user)).jetstream()

    async def publish(event: m.Event) -> None:
        event = msgspec.structs.replace(event, producer=user)
        await js.publish(catalog.bus_subject_of(event), codec.encode(event),
                         headers={"Nats-Msg-Id": event.id})

    return publish


def update(incident: str, i: int) -> m.IncidentUpdated:
    return m.IncidentUpdated(incident_id=incident, subject="webshop", invariant="p99_latency",
                             value=float(i), producer="detector")


# --- tests --------------------------------------------------------------------------------


async def test_every_kind_is_recorded_once_with_its_exact_bytes(bus: Bus) -> None:
    await start_auditor(bus)
    sent = one_of_each("inc0001aaaa")
    assert {m.kind_of(type(e)) for _, e in sent} == AUDITED
    for user, event in sent:
        await bus.publish(user, event)
    rows = await wait_rows(bus, len(sent))
    # One consumer per stream: each stream's events keep their order, the two interleave.
    rows.sort(key=lambda r: (r[4] == catalog.DLQ_STREAM, r[5]))
    assert [r[1] for r in rows] == [e.id for _, e in sent]
    for (seq, _, kind, bus_subject, stream, _, payload), (_, event) in zip(rows, sent,
                                                                            strict=True):
        assert payload == codec.encode(event), seq
        assert kind == m.kind_of(type(event))
        assert bus_subject == catalog.bus_subject_of(event)
        assert stream == catalog.spec_of(type(event)).stream
    assert [r[5] for r in rows] == [*range(1, len(sent)), 1]  # stream positions

    # The same event again (a publisher retry past the dedup window): no new row.
    first = sent[0][1]
    await bus.publish_raw(catalog.bus_subject_of(first), codec.encode(first))
    marker = update("inc0001aaaa", 99)
    await bus.publish("detector", marker)
    rows = await wait_rows(bus, len(sent) + 1)
    await asyncio.sleep(0.3)
    rows = read_rows(db_path(bus))
    assert len(rows) == len(sent) + 1 and rows[-1][1] == marker.id
    assert await verify(bus) == len(sent) + 1

    # The read-only query service answers the timeline from the same record.
    nc = await bus.connect(catalog.OPERATOR)
    timeline = catalog.service_subject("auditor", "timeline")
    reply = msgspec.json.decode((await nc.request(timeline, b"inc0001", timeout=5)).data)
    assert reply["ok"] and reply["incident_id"] == "inc0001aaaa"
    # The last three (control, kill re-engaged, dead letter) belong to no incident.
    assert [e["id"] for e in reply["events"]] == [e.id for _, e in sent[:-4]] + [marker.id]
    bad = msgspec.json.decode(
        (await nc.request(timeline, b"nope", timeout=5)).data)
    assert not bad["ok"] and "no incident" in bad["error"]


async def test_events_already_committed_before_a_crash_are_not_doubled(bus: Bus) -> None:
    """The crash window between commit and ack: the row exists, the message comes again."""
    publish = await publisher(bus)
    events = [update("inc-crash", i) for i in range(6)]
    for e in events:
        await publish(e)
    # Record the first three exactly as the auditor would, then "crash" before acking.
    store = await AuditStore.open(db_path(bus))
    for seq, e in enumerate(events[:3], 1):
        await store.append(e, codec.encode(e), bus_subject=catalog.bus_subject_of(e),
                           stream=catalog.EVENTS_STREAM, stream_seq=seq)
    await store.close()
    await start_auditor(bus)
    rows = await wait_rows(bus, 6)
    await asyncio.sleep(0.5)  # let any doubled row land before counting
    rows = read_rows(db_path(bus))
    assert [r[1] for r in rows] == [e.id for e in events]
    assert await verify(bus) == 6


async def test_sigterm_restart_leaves_no_gap(bus: Bus) -> None:
    proc = await start_auditor(bus)
    publish = await publisher(bus)
    published: list[str] = []
    more = asyncio.Event()

    async def keep_publishing() -> None:
        for i in range(60):
            e = update("inc-restart", i)
            await publish(e)
            published.append(e.id)
            more.set()
            await asyncio.sleep(0.02)

    task = asyncio.create_task(keep_publishing())
    await wait_rows(bus, 10)
    assert proc.terminate() == 0, proc.log()[-2000:]
    down_at = len(published)
    while len(published) < down_at + 10 and not task.done():  # some land while it is down
        more.clear()
        await more.wait()
    await start_auditor(bus)
    await task
    rows = await wait_rows(bus, 60)
    assert [r[1] for r in rows] == published  # every event, once, in publish order
    assert await verify(bus) == 60


async def test_sigkill_mid_stream_loses_and_doubles_nothing(bus: Bus) -> None:
    proc = await start_auditor(bus)
    publish = await publisher(bus)
    published: list[str] = []

    async def keep_publishing() -> None:
        for i in range(300):
            e = update("inc-kill", i)
            await publish(e)
            published.append(e.id)
            await asyncio.sleep(0.003)

    task = asyncio.create_task(keep_publishing())
    await wait_rows(bus, 40)
    proc.kill()
    await asyncio.sleep(0.3)
    await start_auditor(bus)
    await task
    # What the killed process had fetched but not acked comes back after the
    # consumer's AckWait (30 s), so allow for it.
    rows = await wait_rows(bus, 300, within=50)
    await asyncio.sleep(0.5)
    rows = read_rows(db_path(bus))
    assert len(rows) == 300 and len({r[1] for r in rows}) == 300
    assert [r[1] for r in sorted(rows, key=lambda r: r[5])] == published
    assert await verify(bus) == 300
    store = await AuditStore.open(db_path(bus), readonly=True)
    _, timeline = await store.timeline("inc-kill")
    await store.close()
    assert [r.event_id for r in timeline] == published  # timelines follow bus order
    db = sqlite3.connect(db_path(bus))
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


async def test_dead_letters_are_recorded(bus: Bus) -> None:
    await start_auditor(bus)
    opened_subject = catalog.subject_for(m.IncidentOpened, subject="webshop")
    junk_seq = await bus.publish_raw(opened_subject, b"{not json")
    verdict = m.Verdict(subject="webshop", plan_id="p", invariant="i", passed=True, reason="r")
    misplaced_seq = await bus.publish_raw(opened_subject, codec.encode(verdict))
    rows = await wait_rows(bus, 2)
    letters = [codec.decode(r[6]) for r in rows]
    assert all(isinstance(d, m.DeadLetter) for d in letters)
    assert {r[3] for r in rows} == {catalog.subject_for(m.DeadLetter, actor="auditor")}
    assert {r[4] for r in rows} == {catalog.DLQ_STREAM}
    by_seq = {d.stream_seq: d for d in letters if isinstance(d, m.DeadLetter)}
    assert "malformed JSON" in by_seq[junk_seq].reason
    assert by_seq[junk_seq].payload_head == "{not json"
    assert by_seq[junk_seq].bus_subject == opened_subject
    assert by_seq[misplaced_seq].reason  # a verdict on an incident subject
    assert await verify(bus) == 2


async def test_a_locked_database_delays_but_loses_nothing(bus: Bus) -> None:
    await start_auditor(bus)
    beat = await bus.wait_heartbeat("auditor")
    publish = await publisher(bus)
    await publish(update("inc-lock", 0))
    await wait_rows(bus, 1)
    blocker = sqlite3.connect(db_path(bus), isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database
    events = [update("inc-lock", i) for i in range(1, 4)]
    for e in events:
        await publish(e)
    metrics_url = f"http://127.0.0.1:{beat.metrics_port}/metrics"
    deadline = time.monotonic() + 20
    while "menders_audit_write_errors_total" not in await _metric_lines(metrics_url):
        assert time.monotonic() < deadline, "the auditor never hit the lock"
        await asyncio.sleep(0.3)
    assert len(read_rows(db_path(bus))) == 1
    blocker.execute("ROLLBACK")
    blocker.close()
    rows = await wait_rows(bus, 4)
    assert [r[1] for r in rows[1:]] == [e.id for e in events]
    assert await verify(bus) == 4


async def _metric_lines(url: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body: bytes = resp.read()
        return "\n".join(ln for ln in body.decode().splitlines()
                         if ln.startswith("menders_audit_write_errors_total") and
                         not ln.endswith(" 0.0"))

    return await asyncio.to_thread(get)


async def test_audit_command_shows_timelines_lists_incidents_and_names_the_tampered_row(
        bus: Bus, tmp_path: Path) -> None:
    code, _, err = await run_cli(bus, "--verify")
    assert code == 1 and str(db_path(bus)) in err and "no audit database" in err

    await start_auditor(bus)
    sent = one_of_each("inc0002bbbb")
    for user, event in sent:
        await bus.publish(user, event)
    await wait_rows(bus, len(sent))
    incident_events = [e for _, e in sent if e.incident_id == "inc0002bbbb"]

    code, out, err = await run_cli(bus, "inc0002")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"incident inc0002bbbb: {len(incident_events)} events"
    kinds = [ln.split()[1] for ln in lines[1:]]
    assert kinds == [m.kind_of(type(e)) for e in incident_events]
    assert "restart_worker SUCCEEDED" in out and "PASS p99_latency: held 3s" in out

    code, out, _ = await run_cli(bus, "inc0002bbbb", "--json")
    assert code == 0
    records = [msgspec.json.decode(ln) for ln in out.splitlines()]
    assert [r["event"]["id"] for r in records] == [e.id for e in incident_events]
    assert all(r["stream"] == catalog.EVENTS_STREAM and r["hash"] for r in records)

    code, out, _ = await run_cli(bus)
    assert code == 0
    assert "inc0002bbbb" in out and "p99_latency" in out and "webshop" in out
    assert "resolved, then escalated" in out  # a late escalation, after it healed

    code, out, _ = await run_cli(bus, "--verify")
    assert (code, out.strip().split(" (")[0]) == (0, f"chain OK: {len(sent)} rows")

    code, _, err = await run_cli(bus, "deadbeef")
    assert code == 1 and "no incident 'deadbeef'" in err

    # Tamper with a copy: drop the guard, then edit the Decision's payload. Its row is
    # looked up by event id: the dead letter arrives through a second consumer, so the
    # order of rows across the two streams is the auditor's, not the test's.
    tampered = next(e for _, e in sent if isinstance(e, m.Decision))
    assert tampered.reason == "high risk"
    copy = tmp_path / "tampered.db"
    backup(db_path(bus), copy)
    db = sqlite3.connect(copy)
    (seq,) = db.execute("SELECT seq FROM events WHERE event_id = ?", (tampered.id,)).fetchone()
    db.execute("DROP TRIGGER events_no_update")
    db.execute("UPDATE events SET payload = CAST(REPLACE(CAST(payload AS TEXT), 'high risk', "
               "'low risk') AS BLOB) WHERE seq = ?", (seq,))
    db.commit()
    db.close()
    code, out, _ = await run_cli(bus, "--verify", "--db", str(copy))
    assert code == 1
    assert f"chain BROKEN at seq {seq} (event {tampered.id}): hash mismatch" in out
    assert "events_no_update" in out
    code, out, _ = await run_cli(bus, "--verify", "--json", "--db", str(copy))
    report = msgspec.json.decode(out)
    assert code == 1 and report["first_bad"]["seq"] == seq and not report["ok"]
