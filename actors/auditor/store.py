"""The audit record: an append-only, hash-chained SQLite table (aiosqlite).

Each row's hash covers the previous row's hash, the row's own canonical fields
and the exact payload bytes received from the bus, so editing, deleting or
reordering any row breaks the chain from that row on, and `verify()` names the
first bad row. Triggers make the database itself refuse UPDATE and DELETE;
the chain is what still catches someone who drops the triggers and edits the
file anyway.

Durability: WAL with synchronous=FULL. The auditor acks a message only after
its row is committed, and JetStream never redelivers an acked message, so a
commit that a power loss could still undo (synchronous=NORMAL in WAL mode)
would be a hole in the record that nothing repairs. FULL fsyncs the WAL on
every commit; the lifecycle event rate is low enough to pay for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import msgspec

from bus_schemas import codec
from bus_schemas import messages as m
from bus_schemas.errors import MendersError
from bus_schemas.queries import IncidentRow

DEFAULT_NAME = "audit.db"
GENESIS = "0" * 64  # prev_hash of the first row
# One row always: the event id's seq and payload (NULLs when unseen) and the head's seq
# and hash (NULLs when the record is empty).
_DUP_AND_HEAD = (
    "SELECT e.seq, e.payload, h.seq, h.hash FROM (SELECT 1)"
    " LEFT JOIN events e ON e.event_id = ?"
    " LEFT JOIN (SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1) h")
SCHEMA_VERSION = 1
TRIGGERS = ("events_no_update", "events_no_delete")
COLUMNS = ("seq, event_id, kind, incident_id, subject, producer, ts, bus_subject, stream, "
           "stream_seq, payload, prev_hash, hash")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY,  -- assigned by append(): 1, 2, 3... without gaps
    event_id    TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    incident_id TEXT NOT NULL,
    subject     TEXT NOT NULL,
    producer    TEXT NOT NULL,
    ts          REAL NOT NULL,
    bus_subject TEXT NOT NULL,
    stream      TEXT NOT NULL,
    stream_seq  INTEGER NOT NULL,
    payload     BLOB NOT NULL,        -- the exact bytes received from the bus
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_incident ON events (incident_id, seq);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the audit record is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the audit record is append-only: DELETE refused'); END;
"""


class AuditError(MendersError):
    """A clear, user-facing problem with the record or a query on it."""


def default_path(home: Path) -> Path:
    return home / DEFAULT_NAME


@dataclass(frozen=True)
class Record:
    seq: int
    event_id: str
    kind: str
    incident_id: str
    subject: str
    producer: str
    ts: float
    bus_subject: str
    stream: str
    stream_seq: int
    payload: bytes
    prev_hash: str
    hash: str

    def event(self) -> m.Event:
        return codec.decode(self.payload)


@dataclass(frozen=True)
class Appended:
    seq: int
    inserted: bool  # False: this event id was already recorded (a redelivery)


@dataclass(frozen=True)
class Problem:
    seq: int
    event_id: str
    what: str

    def __str__(self) -> str:
        return f"seq {self.seq} (event {self.event_id}): {self.what}"


@dataclass(frozen=True)
class VerifyReport:
    rows: int  # rows checked up to (not including) the first problem
    head_hash: str
    problem: Problem | None
    missing_triggers: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.problem is None and not self.missing_triggers


def row_hash(prev_hash: str, seq: int, event_id: str, kind: str, incident_id: str,
             subject: str, producer: str, ts: float, bus_subject: str, stream: str,
             stream_seq: int, payload: bytes) -> str:
    # Canonical fields as a JSON array (msgspec writes floats as their shortest
    # round-trip repr, so a REAL read back from SQLite encodes identically); the
    # payload length is in it so field and payload bytes can never be shifted.
    fields = msgspec.json.encode([seq, event_id, kind, incident_id, subject, producer, ts,
                                  bus_subject, stream, stream_seq, len(payload)])
    h = hashlib.sha256(prev_hash.encode("ascii"))
    h.update(fields)
    h.update(payload)
    return h.hexdigest()


def _record(row: Iterable[object]) -> Record:
    return Record(*row)  # type: ignore[arg-type]


def _hash_of(r: Record, prev_hash: str) -> str:
    return row_hash(prev_hash, r.seq, r.event_id, r.kind, r.incident_id, r.subject, r.producer,
                    r.ts, r.bus_subject, r.stream, r.stream_seq, bytes(r.payload))


def _readonly_uri(path: Path) -> str:
    # A plain open would create a missing file; mode=ro never writes anything.
    if not path.exists():
        raise AuditError(f"no audit database at {path}")
    return f"{path.resolve().as_uri()}?mode=ro"


def _make_parent(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)


class AuditStore:
    def __init__(self, db: aiosqlite.Connection, path: Path, readonly: bool) -> None:
        self.db = db
        self.path = path
        self.readonly = readonly
        self._lock = asyncio.Lock()  # one append (read head, insert, commit) at a time

    @classmethod
    async def open(cls, path: Path, *, readonly: bool = False) -> AuditStore:
        if readonly:
            db = await aiosqlite.connect(_readonly_uri(path), uri=True, isolation_level=None)
            store = cls(db, path, True)
            try:
                await store.db.execute("SELECT 1 FROM events LIMIT 1")
            except sqlite3.DatabaseError as exc:
                await db.close()
                raise AuditError(f"{path} is not an audit database: {exc}") from None
            return store
        _make_parent(path)
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE in append).
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.executescript(_SCHEMA)
        await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return cls(db, path, False)

    async def close(self) -> None:
        async with self._lock:
            await self.db.close()

    # --- writing -------------------------------------------------------------------

    async def append(self, event: m.Event, payload: bytes, *, bus_subject: str, stream: str,
                     stream_seq: int) -> Appended:
        """Record one event; a second append of the same event id adds nothing."""
        event_id = event.id or f"{stream}:{stream_seq}"  # an id-less event keys on its position
        kind = m.kind_of(event)
        async with self._lock:
            # IMMEDIATE takes the write lock before the head is read, so even a
            # second writer process could not fork the chain.
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                # The duplicate check and the head in one statement: each aiosqlite call is
                # a hop to its thread, and this is the record's hot path
                # (bench/audit_write.py).
                (found_seq, found_payload, head_seq, head_hash), = \
                    await self.db.execute_fetchall(_DUP_AND_HEAD, (event_id,))
                if found_seq is not None and bytes(found_payload) == payload:
                    await self.db.execute("ROLLBACK")
                    return Appended(int(found_seq), False)
                if found_seq is not None:
                    # Same id, other bytes: not a redelivery but a forgery or a bug.
                    # Record it too, under its stream position, so nothing the bus
                    # carried is hidden from the record.
                    event_id = f"{event_id}@{stream}:{stream_seq}"
                    async with self.db.execute(
                        "SELECT seq FROM events WHERE event_id = ?", (event_id,)
                    ) as cur:
                        again = await cur.fetchone()
                    if again is not None:
                        await self.db.execute("ROLLBACK")
                        return Appended(int(again[0]), False)
                seq, prev = (int(head_seq), str(head_hash)) if head_seq is not None \
                    else (0, GENESIS)
                seq += 1
                fields = (seq, event_id, kind, event.incident_id, event.subject, event.producer,
                          float(event.ts), bus_subject, stream, stream_seq)
                digest = row_hash(prev, *fields, payload)
                await self.db.execute(
                    f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (*fields, payload, prev, digest),
                )
                await self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    await self.db.execute("ROLLBACK")
                raise
        return Appended(seq, True)

    # --- reading -------------------------------------------------------------------

    async def _head(self) -> tuple[int, str]:
        async with self.db.execute(
            "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1"
        ) as cur:
            row = await cur.fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    async def head(self) -> tuple[int, str]:
        """The last row's seq and hash: (0, GENESIS) when empty."""
        return await self._head()

    async def count(self) -> int:
        async with self.db.execute("SELECT COUNT(*) FROM events") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def records(self, after_seq: int = 0) -> AsyncGenerator[Record, None]:
        async with self.db.execute(
            f"SELECT {COLUMNS} FROM events WHERE seq > ? ORDER BY seq", (after_seq,)
        ) as cur:
            async for row in cur:
                yield _record(row)

    async def verify(self) -> VerifyReport:
        """Walk the chain from the first row; stop at the first bad one."""
        async with self.db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'events'"
        ) as cur:
            present = {str(n) for n, sql in await cur.fetchall() if "RAISE(ABORT" in (sql or "")}
        missing = tuple(t for t in TRIGGERS if t not in present)
        prev, expected, rows = GENESIS, 1, 0
        async with contextlib.aclosing(self.records()) as records:
            async for r in records:
                problem = None
                if r.seq != expected:
                    problem = f"gap in seq: expected {expected}, found {r.seq}"
                elif r.prev_hash != prev:
                    problem = (f"broken link: prev_hash {r.prev_hash[:16]}... but row "
                               f"{expected - 1} has hash {prev[:16]}...")
                elif _hash_of(r, prev) != r.hash:
                    problem = "hash mismatch: the row's fields or payload were changed"
                if problem:
                    return VerifyReport(rows, prev, Problem(r.seq, r.event_id, problem), missing)
                prev, expected, rows = r.hash, expected + 1, rows + 1
        return VerifyReport(rows, prev, None, missing)

    async def resolve_incident(self, ref: str) -> str:
        """An incident id from the id itself or a unique prefix of it."""
        if not ref:
            raise AuditError("an incident id (or prefix) is needed")
        escaped = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        async with self.db.execute(
            "SELECT DISTINCT incident_id FROM events WHERE incident_id LIKE ? ESCAPE '\\' "
            "ORDER BY incident_id LIMIT 11", (escaped + "%",)
        ) as cur:
            found = [str(r[0]) for r in await cur.fetchall()]
        if ref in found:
            return ref
        if not found:
            raise AuditError(f"no incident {ref!r} in {self.path}")
        if len(found) > 1:
            raise AuditError(f"incident prefix {ref!r} is ambiguous: "
                             + ", ".join(found[:10]) + (", ..." if len(found) > 10 else ""))
        return found[0]

    async def timeline(self, ref: str) -> tuple[str, list[Record]]:
        """An incident's events in bus order (its id may be a unique prefix).

        Bus order, not record order: after an auditor crash, the messages the
        dead process had fetched come back only when their AckWait expires, so
        they are recorded after later ones. The stream position is the truth.
        """
        incident_id = await self.resolve_incident(ref)
        async with self.db.execute(
            f"SELECT {COLUMNS} FROM events WHERE incident_id = ? "
            "ORDER BY stream, stream_seq, seq", (incident_id,)
        ) as cur:
            return incident_id, [_record(r) for r in await cur.fetchall()]

    async def incidents(self, limit: int = 20, *, only_open: bool = False) -> list[IncidentRow]:
        """The most recently opened incidents, newest first."""
        async with self.db.execute(
            """SELECT incident_id, MIN(ts), COUNT(*),
                      MIN(CASE WHEN kind = 'incident.opened' THEN seq END),
                      MIN(CASE WHEN kind = 'incident.escalated' THEN seq END),
                      MAX(CASE WHEN kind = 'incident.escalated' THEN seq END),
                      MAX(CASE WHEN kind = 'incident.resolved' THEN seq END)
               FROM events WHERE incident_id != '' GROUP BY incident_id
               ORDER BY MIN(seq) DESC""",
        ) as cur:
            groups = await cur.fetchall()
        out: list[IncidentRow] = []
        for incident_id, opened, n, opened_seq, first_esc, last_esc, resolved_seq in groups:
            outcome = incident_outcome(first_esc, last_esc, resolved_seq)
            if only_open and outcome not in ("open", "escalated"):
                continue
            subject, invariant = "", ""
            if opened_seq:
                first = await self._event_at(opened_seq)
                subject, invariant = first.subject, getattr(first, "invariant", "")
            out.append(IncidentRow(incident_id=str(incident_id), subject=subject,
                                   invariant=invariant, opened=float(opened),
                                   outcome=outcome, events=int(n)))
            if len(out) >= limit:
                break
        return out

    async def _event_at(self, seq: int) -> m.Event:
        async with self.db.execute("SELECT payload FROM events WHERE seq = ?", (seq,)) as cur:
            row = await cur.fetchone()
        assert row is not None
        return codec.decode(bytes(row[0]))


def incident_outcome(first_escalation: int | None, last_escalation: int | None,
                     resolved: int | None) -> str:
    """How an incident stands, from the record positions of its escalations and its last
    resolution: an escalated incident is not ended while it is still broken."""
    if resolved is None:
        return "escalated" if first_escalation is not None else "open"
    if last_escalation is not None and last_escalation > resolved:
        return "resolved, then escalated"  # a human was called after it healed
    if first_escalation is not None:
        return "escalated, then resolved"
    return "resolved"
