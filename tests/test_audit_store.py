"""The audit store on its own: chain, idempotence, append-only triggers, tamper detection."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from pathlib import Path

import msgspec
import pytest

from actors.auditor.store import GENESIS, AuditError, AuditStore, row_hash
from bus_schemas import catalog, codec
from bus_schemas import messages as m

STREAM = catalog.EVENTS_STREAM


def opened(incident_id: str, subject: str = "webshop") -> m.IncidentOpened:
    return m.IncidentOpened(incident_id=incident_id, subject=subject, producer="detector",
                            invariant="p99_latency", summary="slow", value=900, threshold=250)


async def append(store: AuditStore, event: m.Event, seq: int) -> int:
    res = await store.append(event, codec.encode(event),
                             bus_subject=catalog.bus_subject_of(event), stream=STREAM,
                             stream_seq=seq)
    return res.seq


async def filled(tmp_path: Path, n: int = 5) -> tuple[AuditStore, list[m.Event]]:
    store = await AuditStore.open(tmp_path / "audit.db")
    events: list[m.Event] = [opened("inc-a")]
    events += [m.IncidentUpdated(incident_id="inc-a", subject="webshop", invariant="p99_latency",
                                 value=float(i)) for i in range(n - 2)]
    events.append(m.IncidentResolved(incident_id="inc-a", subject="webshop",
                                     invariant="p99_latency", reason="ok"))
    for i, e in enumerate(events, 1):
        assert await append(store, e, i) == i
    return store, events


def tamper(path: Path, *sql: str) -> None:
    """What someone with the file could do: drop the guards, then edit rows."""
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER events_no_update")
    db.execute("DROP TRIGGER events_no_delete")
    for stmt in sql:
        db.execute(stmt)
    db.commit()
    db.close()


async def test_chain_links_every_row_and_verifies(tmp_path: Path) -> None:
    store, events = await filled(tmp_path)
    rows = [r async for r in store.records()]
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(rows))
    assert [r.payload for r in rows] == [codec.encode(e) for e in events]
    report = await store.verify()
    assert report.ok and report.rows == 5 and report.head_hash == rows[-1].hash
    await store.close()


async def test_same_event_twice_adds_no_row(tmp_path: Path) -> None:
    store, events = await filled(tmp_path, 3)
    again = await store.append(events[1], codec.encode(events[1]), bus_subject="x",
                               stream=STREAM, stream_seq=99)
    assert (again.seq, again.inserted) == (2, False)
    assert await store.count() == 3 and (await store.verify()).ok
    await store.close()


async def test_same_id_other_bytes_is_kept_under_its_stream_position(tmp_path: Path) -> None:
    store, events = await filled(tmp_path, 3)
    forged = msgspec.structs.replace(events[0], summary="nothing to see")
    first = await store.append(forged, codec.encode(forged), bus_subject="x", stream=STREAM,
                               stream_seq=42)
    second = await store.append(forged, codec.encode(forged), bus_subject="x", stream=STREAM,
                                stream_seq=42)
    assert first.inserted and not second.inserted and first.seq == second.seq == 4
    rows = [r async for r in store.records()]
    assert rows[-1].event_id == f"{events[0].id}@{STREAM}:42"
    assert (await store.verify()).ok
    await store.close()


async def test_concurrent_appends_keep_one_chain(tmp_path: Path) -> None:
    store = await AuditStore.open(tmp_path / "audit.db")
    events = [opened(f"inc-{i}") for i in range(40)]
    await asyncio.gather(*(append(store, e, i) for i, e in enumerate(events, 1)))
    report = await store.verify()
    assert report.ok and report.rows == 40
    await store.close()


async def test_database_refuses_update_and_delete(tmp_path: Path) -> None:
    store, _ = await filled(tmp_path, 3)
    await store.close()
    db = sqlite3.connect(tmp_path / "audit.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE events SET payload = x'00' WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM events WHERE seq = 3")
    db.close()


async def test_the_store_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    store = await AuditStore.open(tmp_path / "audit.db")
    async with store.db.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone()) == ("wal",)
    async with store.db.execute("PRAGMA synchronous") as cur:
        assert (await cur.fetchone()) == (2,)  # FULL
    await store.close()


@pytest.mark.parametrize(
    ("sql", "seq", "good", "what"),
    [
        (("UPDATE events SET payload = CAST(REPLACE(CAST(payload AS TEXT), 'ok', 'no') AS BLOB)"
          " WHERE seq = 5",), 5, 4, "hash mismatch"),
        (("UPDATE events SET incident_id = 'other' WHERE seq = 3",), 3, 2, "hash mismatch"),
        (("DELETE FROM events WHERE seq = 2",), 3, 1, "gap in seq: expected 2, found 3"),
        (("UPDATE events SET ts = ts + 1 WHERE seq = 2",
          "UPDATE events SET hash = 'f' || substr(hash, 2) WHERE seq = 2"), 2, 1, "hash mismatch"),
    ],
)
async def test_tampering_names_the_first_bad_row(tmp_path: Path, sql: tuple[str, ...], seq: int,
                                                 good: int, what: str) -> None:
    store, events = await filled(tmp_path)
    await store.close()
    tamper(tmp_path / "audit.db", *sql)
    ro = await AuditStore.open(tmp_path / "audit.db", readonly=True)
    report = await ro.verify()
    assert not report.ok and report.problem is not None
    assert (report.problem.seq, report.rows) == (seq, good)
    assert what in report.problem.what
    assert report.problem.event_id == events[seq - 1].id
    assert report.missing_triggers == ("events_no_update", "events_no_delete")
    await ro.close()


async def test_rehashed_row_breaks_the_next_link(tmp_path: Path) -> None:
    store, _ = await filled(tmp_path)
    row = [r async for r in store.records()][1]
    await store.close()
    # Edit row 2 and give it a correct hash: row 3 no longer links to it.
    fixed = row_hash(row.prev_hash, row.seq, row.event_id, row.kind, row.incident_id,
                     row.subject, row.producer, row.ts + 60, row.bus_subject, row.stream,
                     row.stream_seq, row.payload)
    tamper(tmp_path / "audit.db",
           f"UPDATE events SET ts = ts + 60, hash = '{fixed}' WHERE seq = 2")
    ro = await AuditStore.open(tmp_path / "audit.db", readonly=True)
    report = await ro.verify()
    assert report.problem is not None and report.problem.seq == 3
    assert "broken link" in report.problem.what
    await ro.close()


async def test_timeline_takes_a_unique_literal_prefix_and_incidents_list_each_outcome(
        tmp_path: Path) -> None:
    store = await AuditStore.open(tmp_path / "audit.db")
    await append(store, opened("abc123", "webshop"), 1)
    await append(store, opened("abd999", "ratelimit"), 2)
    await append(store, m.IncidentEscalated(incident_id="abd999", subject="ratelimit",
                                            reason="out of ideas"), 3)
    await append(store, m.Verdict(incident_id="abc123", subject="webshop", plan_id="p",
                                  invariant="p99_latency", passed=True, reason="holds"), 4)
    incident_id, records = await store.timeline("abc")
    assert incident_id == "abc123"
    assert [r.kind for r in records] == ["incident.opened", "verdict"]
    with pytest.raises(AuditError, match="ambiguous"):
        await store.timeline("ab")
    with pytest.raises(AuditError, match="no incident"):
        await store.timeline("zzz")
    with pytest.raises(AuditError, match="no incident"):
        await store.timeline("a%")  # LIKE wildcards are literal
    await append(store, opened("cafe01", "etcd"), 5)
    await append(store, m.IncidentEscalated(incident_id="cafe01", subject="etcd",
                                            reason="no quorum"), 6)
    await append(store, m.IncidentResolved(incident_id="cafe01", subject="etcd",
                                           invariant="quorum", reason="holds again"), 7)
    listed = await store.incidents()
    assert [(i.incident_id, i.subject, i.outcome) for i in listed] == [
        ("cafe01", "etcd", "escalated, then resolved"),
        ("abd999", "ratelimit", "escalated"), ("abc123", "webshop", "open")]
    # Escalated is not ended: it is still broken, so it is listed among the open ones.
    assert [i.incident_id for i in await store.incidents(only_open=True)] == [
        "abd999", "abc123"]
    await store.close()


async def test_readonly_store_cannot_write_and_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match=str(tmp_path / "nope.db")):
        await AuditStore.open(tmp_path / "nope.db", readonly=True)
    assert not (tmp_path / "nope.db").exists()
    store, _ = await filled(tmp_path, 2)
    await store.close()
    ro = await AuditStore.open(tmp_path / "audit.db", readonly=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        await append(ro, opened("x"), 9)
    await ro.close()
