"""Incident memory: every closed incident, indexed so a new one can ask "seen this before?".

The auditor holds every event, so it builds the memory: when an incident
closes (resolved or escalated), and again when a trailing verdict or summary
arrives, its timeline is folded into one `PastIncident` and upserted into a
SQLite FTS5 index in its own file (`memory.db`). The audit record stays
append-only; the memory is derived from it and may be rebuilt at any time.

Similarity is lexical, on purpose: each symptom becomes a bucketed token
(`pool_utilization_r4` = 0.8..1.0, `p99_ms_e2` = 100..999), so two incidents
with the same shape of symptoms share tokens, and bm25 ranks the incidents
that share the most (and the rarest) of them, the broken invariant weighted
highest. Log words and hypotheses add context. No model, no embeddings.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from actors.runtime.redaction import Redactor
from bus_schemas import messages as m
from bus_schemas.queries import PastIncident, SimilarQuery, symptom_tokens

log = logging.getLogger("menders.auditor")

DEFAULT_NAME = "memory.db"
MAX_QUERY_TERMS = 48
MAX_TEXT_CHARS = 4000
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]{2,40}")
# A recall scores every candidate (bm25), so its cost grows with the history: it asks
# only a subject's most recently closed incidents, which keeps it near a millisecond
# however long the auditor has run (a recall is on the path from incident to fix).
RECALL_WINDOW = 500
_SCHEMA = """
CREATE TABLE IF NOT EXISTS incidents (
    incident_id TEXT PRIMARY KEY,
    subject     TEXT NOT NULL,
    invariant   TEXT NOT NULL,
    closed_at   REAL NOT NULL,
    record      BLOB NOT NULL      -- a PastIncident, JSON
);
CREATE INDEX IF NOT EXISTS incidents_by_subject ON incidents (subject);
"""
# The index's rowid is its incident's rowid in `incidents` (which a re-index renews):
# "the subject's newest N" is then a range of rowids FTS5 can skip to. Version 1 had
# neither that nor the subject column; the index is derived, so it is rebuilt.
_FTS_VERSION = 2
_FTS = """
DROP TABLE IF EXISTS incidents_fts;
CREATE VIRTUAL TABLE incidents_fts USING fts5(
    incident_id UNINDEXED, subject, invariant, symptoms, text,
    tokenize = "unicode61 tokenchars '_'"
);
"""
# bm25 column weights: incident_id, subject (a filter, not a likeness), invariant,
# symptoms, text.
_WEIGHTS = (0.0, 0.0, 6.0, 2.0, 0.5)


def default_path(home: Path) -> Path:
    return home / DEFAULT_NAME


def words(text: str) -> list[str]:
    seen: dict[str, None] = {}
    for w in _WORD.findall(text[:MAX_TEXT_CHARS]):
        seen.setdefault(w.lower(), None)
    return list(seen)


def _quoted(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def match_expression(q: SimilarQuery) -> str:
    """An FTS5 query: every term quoted (no operator injection), OR-ed."""
    terms = [q.invariant] if q.invariant else []
    terms += symptom_tokens(q.symptoms)
    terms += words(q.text)
    terms = [t for t in dict.fromkeys(terms) if t][:MAX_QUERY_TERMS]
    return " OR ".join(_quoted(t) for t in terms)


async def _index(db: aiosqlite.Connection, p: PastIncident, record: bytes) -> None:
    """Upsert one incident's row and its index row, under the row's new rowid."""
    async with db.execute("SELECT rowid FROM incidents WHERE incident_id = ?",
                          (p.incident_id,)) as cur:
        old = await cur.fetchone()
    if old is not None:
        await db.execute("DELETE FROM incidents_fts WHERE rowid = ?", (old[0],))
    async with db.execute("INSERT OR REPLACE INTO incidents VALUES (?, ?, ?, ?, ?)",
                          (p.incident_id, p.subject, p.invariant, p.closed_at, record)) as cur:
        rowid = cur.lastrowid
    await _index_row(db, rowid, p)


async def _index_row(db: aiosqlite.Connection, rowid: int | None, p: PastIncident) -> None:
    await db.execute(
        "INSERT INTO incidents_fts (rowid, incident_id, subject, invariant, symptoms, text) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (rowid, p.incident_id, p.subject, p.invariant, " ".join(symptom_tokens(p.symptoms)),
         _text_of(p)))


async def _rebuild_index(db: aiosqlite.Connection) -> None:
    """Rebuild the full-text index from the stored records, in one transaction."""
    try:
        await db.executescript("BEGIN;" + _FTS)
        async with db.execute("SELECT rowid, record FROM incidents") as cur:
            rows = list(await cur.fetchall())
        for rowid, record in rows:
            try:
                past = msgspec.json.decode(record, type=PastIncident)
            except msgspec.DecodeError as exc:  # the index is a guide: go on without it
                log.error("memory record unreadable, not indexed",
                          extra={"rowid": rowid, "err": repr(exc)})
                continue
            await _index_row(db, rowid, past)
        await db.execute(f"PRAGMA user_version = {_FTS_VERSION}")
        await db.commit()
    except BaseException:
        await db.rollback()
        raise


def fold(events: Iterable[m.Event], redactor: Redactor | None = None) -> PastIncident | None:
    """One closed incident from its timeline, its text fields redacted (hypothesis,
    summary, escalation reason: they quote the subject's logs); None while open."""
    opened: m.IncidentOpened | None = None
    diagnosis: m.Diagnosis | None = None
    plans: dict[str, list[m.PlanStep]] = {}
    tried: list[str] = []
    verified: list[m.PlanStep] = []
    outcome, escalation, summary, closed_at = "", "", "", 0.0
    for e in events:
        match e:
            case m.IncidentOpened() if opened is None:
                opened = e
            case m.Diagnosis() if diagnosis is None:
                diagnosis = e
            case m.Plan(steps=[_, *_]):
                plans[e.plan_id] = e.steps
            case m.ExecutionResult():
                tried.append(f"{e.action}:{e.status}")
            # Only a fix that cured a broken invariant teaches anything: a pass whose
            # recovery came before the step (it cleared by itself) is no evidence for it.
            case m.Verdict(passed=True, recovered="after") if e.plan_id in plans:
                verified = plans[e.plan_id]
            case m.IncidentEscalated():
                outcome, escalation, closed_at = "escalated", e.reason, e.ts
            case m.IncidentResolved() if outcome != "escalated":
                outcome, closed_at = "resolved", e.ts
            case m.IncidentSummary():
                summary = e.summary
    if opened is None or not outcome:
        return None
    cut = redactor or Redactor()
    hypothesis = cut.text(diagnosis.hypothesis)[0] if diagnosis else ""
    summary, escalation = cut.text(summary)[0], cut.text(escalation)[0]
    return PastIncident(
        incident_id=opened.incident_id, subject=opened.subject, invariant=opened.invariant,
        opened_at=opened.ts, closed_at=closed_at, outcome=outcome, symptoms=opened.symptoms,
        hypothesis=hypothesis,
        source=diagnosis.source if diagnosis else "", tried=tried,
        verified_action=verified[0].action if verified else "",
        verified_params=dict(verified[0].params) if verified else {},
        verified_steps=[st.action for st in verified] if len(verified) > 1 else [],
        escalation=escalation, summary=summary)


def _text_of(p: PastIncident) -> str:
    return " ".join([p.hypothesis, p.summary, p.escalation, *p.tried])[:MAX_TEXT_CHARS]


class IncidentMemory:
    def __init__(self, db: aiosqlite.Connection, reader: aiosqlite.Connection,
                 path: Path) -> None:
        self.db = db
        # Queries have a connection of their own: under WAL a reader sees the last
        # committed upsert, never one half done, and never waits for the writer (a
        # recall is on the path from incident to fix; an upsert is not).
        self.reader = reader
        self.path = path
        self._lock = asyncio.Lock()  # one upsert at a time on the writer

    @classmethod
    async def open(cls, path: Path) -> IncidentMemory:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.executescript(_SCHEMA)
        await db.commit()
        async with db.execute("PRAGMA user_version") as cur:
            version = (await cur.fetchone() or (0,))[0]
        if version < _FTS_VERSION:
            await _rebuild_index(db)
        reader = await aiosqlite.connect(path)
        await reader.execute("PRAGMA query_only=ON")
        return cls(db, reader, path)

    async def close(self) -> None:
        await self.reader.close()
        await self.db.close()

    async def upsert(self, p: PastIncident) -> None:
        record = msgspec.json.encode(p)
        async with self._lock:
            await self._upsert(p, record)

    async def _upsert(self, p: PastIncident, record: bytes) -> None:
        try:
            await self._write(p, record)
            await self.db.commit()
        except BaseException:
            await self.db.rollback()
            raise

    async def _write(self, p: PastIncident, record: bytes) -> None:
        """The rows of one upsert, in the writer's open transaction."""
        await _index(self.db, p, record)

    async def get(self, incident_id: str) -> PastIncident | None:
        async with self.reader.execute("SELECT record FROM incidents WHERE incident_id = ?",
                                       (incident_id,)) as cur:
            row = await cur.fetchone()
        return msgspec.json.decode(row[0], type=PastIncident) if row else None

    async def similar(self, q: SimilarQuery) -> list[PastIncident]:
        """The closed incidents of `q.subject` most like `q`, most similar first."""
        expr = match_expression(q)
        if not expr:
            return []
        weights = ", ".join(str(w) for w in _WEIGHTS)
        rows = await self._query(weights, expr, q)
        return [msgspec.structs.replace(msgspec.json.decode(r[0], type=PastIncident),
                                        score=float(r[1])) for r in rows]

    async def _query(self, weights: str, expr: str, q: SimilarQuery) -> list[Any]:
        # The subject's phrase narrows the candidates in the index; `i.subject` is exact.
        match = f"subject : {_quoted(q.subject)} AND ({expr})"
        try:
            # One trip to the connection's thread, not three (execute, fetch, close):
            # each is a thread wake-up, and on a busy host each waits for a core.
            return list(await self.reader.execute_fetchall(
                f"""SELECT i.record, bm25(incidents_fts, {weights}) AS score
                    FROM incidents_fts JOIN incidents i ON i.rowid = incidents_fts.rowid
                    WHERE incidents_fts MATCH ? AND incidents_fts.rowid >= coalesce(
                            (SELECT rowid FROM incidents WHERE subject = ?
                             ORDER BY rowid DESC LIMIT 1 OFFSET ?), 0)
                          AND i.subject = ? AND i.incident_id != ?
                    ORDER BY score LIMIT ?""",
                (match, q.subject, RECALL_WINDOW - 1, q.subject, q.exclude,
                 max(1, min(q.limit, 20)))))
        except sqlite3.OperationalError as exc:
            raise ValueError(f"bad similarity query: {exc}") from None
