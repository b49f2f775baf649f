"""The auditor: records every lifecycle event and dead letter in the audit store.

Its row is committed before `handle` returns, and the runtime acks only after
that, so a crash at any point either leaves the message un-acked (redelivered,
and the store's event-id idempotence adds no second row) or already recorded.
It also answers read-only queries on `menders.query.audit.<method>`.

It builds the incident memory too (actors/auditor/memory.py): when an incident
closes, or a trailing verdict or summary of a closed one arrives, the
incident's timeline is folded and indexed, and `similar` queries search it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from actors.auditor.memory import IncidentMemory, fold
from actors.auditor.memory import default_path as memory_path
from actors.auditor.store import AuditError, AuditStore, default_path
from actors.runtime import Actor, Delivery
from actors.runtime.logs import get_logger
from bus_schemas import catalog
from bus_schemas.messages import Event, kind_of
from bus_schemas.queries import (
    MAX_REPLY_EVENTS,
    AuditReply,
    IncidentsReply,
    SimilarQuery,
    SimilarReply,
    TimelineReply,
)

log = get_logger("menders.auditor")

QUERY_SUBJECT = catalog.service_wildcard("auditor")
_reply = msgspec.json.Encoder()
# Events after which an incident's memory entry is (re)built.
MEMORY_TRIGGERS = frozenset({"incident.resolved", "incident.escalated", "verdict",
                             "incident.summary"})


class Auditor(Actor):
    name = "auditor"

    async def setup(self) -> None:
        path = default_path(self.config.home_dir)
        self.store = await AuditStore.open(path)
        # Queries read through their own connection: WAL lets them run beside
        # appends and they never see a half-done append transaction.
        self.reader = await AuditStore.open(path, readonly=True)
        self.memory = await IncidentMemory.open(memory_path(self.config.home_dir))
        # Memory answers the model's similar_incidents tool: no secret may go in.
        self.redactor = self.config.redaction.redactor()
        metrics = self.rt.metrics
        self.appended = metrics.counter(
            "menders_audit_rows_appended", "Rows appended to the audit record", ["stream"])
        self.duplicates = metrics.counter(
            "menders_audit_duplicates", "Deliveries already recorded (redeliveries)", ["stream"])
        self.write_errors = metrics.counter(
            "menders_audit_write_errors", "Failed writes to the audit database, retried", [])
        self.memory_indexed = metrics.counter(
            "menders_memory_indexed", "Closed incidents (re)indexed in the incident memory",
            ["outcome"])
        self.head_seq = metrics.gauge(
            "menders_audit_chain_head_seq", "Seq of the last row in the audit chain", [])
        seq, _ = await self.store.head()
        self.head_seq.labels().set(seq)
        self.query_sub: Subscription | None = await self.rt.nc.subscribe(
            QUERY_SUBJECT, cb=self._on_query)
        log.info("audit record open", extra={"path": str(path), "head_seq": seq})

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        stream = delivery.consumer.stream
        delay = 0.1
        while True:
            try:
                result = await self.store.append(
                    event, delivery.msg.data, bus_subject=delivery.msg.subject, stream=stream,
                    stream_seq=delivery.stream_seq)
                break
            except sqlite3.Error as exc:
                # A locked, full or failing disk: keep the message (the runtime's
                # in_progress keeps it ours) rather than burn its deliveries and
                # dead-letter an event the record would then miss.
                self.write_errors.labels().inc()
                log.error("audit write failed, retrying", extra={"err": repr(exc)})
                if self.rt.stopping.is_set():
                    raise  # nak: the next run records it
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if result.inserted:
            self.appended.labels(stream=stream).inc()
            self.head_seq.labels().set(result.seq)
        else:
            self.duplicates.labels(stream=stream).inc()
        kind = kind_of(event)
        if kind in MEMORY_TRIGGERS and event.incident_id:
            await self._remember(event.incident_id)
        return ()

    async def _remember(self, incident_id: str) -> None:
        # The memory is derived from the record: a failure here is logged, never
        # allowed to hold back the record itself.
        try:
            _, records = await self.store.timeline(incident_id)
            past = fold((r.event() for r in records), self.redactor)
            if past is not None:
                await self.memory.upsert(past)
                self.memory_indexed.labels(outcome=past.outcome).inc()
        except Exception as exc:
            log.error("memory indexing failed", extra={"incident": incident_id,
                                                       "err": repr(exc)})

    async def teardown(self) -> None:
        if self.query_sub is not None:
            await self.query_sub.unsubscribe()
            self.query_sub = None
        await self.reader.close()
        await self.memory.close()
        await self.store.close()

    # --- read-only queries ------------------------------------------------------------

    async def _on_query(self, msg: Msg) -> None:
        if not msg.reply:
            return
        method = msg.subject.rsplit(".", 1)[-1]
        arg = msg.data.decode(errors="replace").strip()
        reply: AuditReply
        try:
            reply = await self._answer(method, arg)
        except AuditError as exc:
            reply = TimelineReply(ok=False, error=str(exc))  # every reply reads an error
        except Exception as exc:  # a bad query must never take the auditor down
            log.error("audit query failed", extra={"method": method, "err": repr(exc)})
            reply = TimelineReply(ok=False, error=f"{type(exc).__name__}: {exc}")
        await msg.respond(_reply.encode(reply))

    async def _answer(self, method: str, arg: str) -> AuditReply:
        if method == "timeline":
            incident_id, records = await self.reader.timeline(arg)
            return TimelineReply(
                ok=True, incident_id=incident_id,
                events=[msgspec.Raw(r.payload) for r in records[:MAX_REPLY_EVENTS]],
                truncated=len(records) > MAX_REPLY_EVENTS)
        if method == "incidents":
            only_open = arg == "open"
            found = await self.reader.incidents(50, only_open=only_open)
            return IncidentsReply(ok=True, incidents=found)
        if method == "similar":
            try:
                q = msgspec.json.decode(arg, type=SimilarQuery)
                return SimilarReply(ok=True, similar=await self.memory.similar(q))
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                raise AuditError(f"bad similar query: {exc}") from None
        known = ", ".join(catalog.QUERY_METHODS["auditor"])
        raise AuditError(f"unknown audit query {method!r}; known: {known}")


ACTOR = Auditor
