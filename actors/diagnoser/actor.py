"""The diagnoser actor: one Diagnosis per opened incident.

How a diagnosis is made sits behind the `Diagnoser` protocol, so the actor
does not care whether runbook rules or Claude produced it. Whatever a
diagnoser proposes is only a proposal: the planner takes registered actions
only, and the governor judges every step.

With ANTHROPIC_API_KEY set, Claude diagnoses (actors/diagnoser/llm/) with the runbooks
as its fallback, and a small model summarises every closed incident. Both
diagnosers consult the incident memory (the auditor's `similar` query).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec
import nats.errors
from nats.aio.client import Client

import subjects
from actors.diagnoser.runbook import MAX_LOG_LINES, RunbookDiagnoser, exclude_tried, no_match
from actors.runtime import Actor, Delivery, Reject, Runtime
from bus_schemas import catalog, codec
from bus_schemas.messages import (
    AttemptRecord,
    Diagnosis,
    DiagnosisRequested,
    Event,
    IncidentEscalated,
    IncidentOpened,
    IncidentResolved,
)
from bus_schemas.queries import (
    LogsInput,
    ObservationsInput,
    ObsQuery,
    ObsReply,
    PastIncident,
    SimilarQuery,
    SimilarReply,
    TimelineReply,
)
from subjects.base import SubjectDefinition
from subjects.rules import check_rules

if TYPE_CHECKING:  # the anthropic SDK is imported only when a key is set: ~50 MB RSS
    from actors.diagnoser.llm.summary import Summarizer

log = logging.getLogger("menders.diagnoser")


class Diagnoser(Protocol):
    source: str

    async def diagnose(self, incident: IncidentOpened, definition: SubjectDefinition,
                       history: Sequence[AttemptRecord] = (),
                       spent_usd: float = 0.0) -> Diagnosis: ...


# The memory only reorders a runbook's alternatives: never worth stalling the loop for.
RECALL_TIMEOUT_S = 0.25


class IncidentRecall:
    """The auditor's incident memory, asked over the bus; empty when it cannot answer.

    The query's text is the incident's last log lines, and the monitor's lookback can
    add lines before the ones the incident carries: `prefetch` asks with what the
    incident has while the lookback runs, and `recall` takes that answer only if the
    query it asked is the one it would ask now (byte for byte), else asks again. The
    answer is the same either way; the common case saves a round trip on the path
    from opened to fixed."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._ahead: dict[str, tuple[bytes, asyncio.Task[Sequence[PastIncident]]]] = {}

    @staticmethod
    def _query(incident: IncidentOpened) -> bytes:
        return msgspec.json.encode(SimilarQuery(
            subject=incident.subject, invariant=incident.invariant,
            symptoms=incident.symptoms, text=" ".join(incident.recent_logs[-20:]),
            exclude=incident.incident_id))

    def prefetch(self, incident: IncidentOpened) -> None:
        self.forget(incident.incident_id)
        q = self._query(incident)
        self._ahead[incident.incident_id] = (q, asyncio.ensure_future(self._ask(q)))

    def forget(self, incident_id: str) -> None:
        """Drop an unused prefetch (a diagnosis that never recalled, or failed)."""
        if (ahead := self._ahead.pop(incident_id, None)) is not None:
            ahead[1].cancel()

    async def recall(self, incident: IncidentOpened) -> Sequence[PastIncident]:
        q = self._query(incident)
        ahead = self._ahead.pop(incident.incident_id, None)
        if ahead is not None:
            if ahead[0] == q:
                return await ahead[1]
            ahead[1].cancel()
        return await self._ask(q)

    async def _ask(self, q: bytes) -> Sequence[PastIncident]:
        try:
            msg = await self.nc.request(catalog.service_subject("auditor", "similar"), q,
                                        timeout=RECALL_TIMEOUT_S)
            reply = msgspec.json.decode(msg.data, type=SimilarReply)
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as exc:
            log.warning("incident memory not reachable", extra={"err": repr(exc)})
            return []
        return reply.similar


def make_diagnoser(rt: Runtime | None = None, memory: IncidentRecall | None = None,
                   ) -> tuple[Diagnoser, Summarizer | None]:
    """The diagnoser this process uses, and the summarizer when there is a key.

    With ANTHROPIC_API_KEY set: Claude (config.llm) with the runbooks as its
    fallback, so an API outage degrades to runbooks (source "claude->runbook").
    """
    if memory is None and rt is not None:
        memory = IncidentRecall(rt.nc)
    runbooks = RunbookDiagnoser(memory.recall if memory is not None else None)
    key = os.environ.get("ANTHROPIC_API_KEY", "")
    if rt is None or not key:
        return runbooks, None
    from actors.diagnoser.llm.claude import ClaudeDiagnoser
    from actors.diagnoser.llm.client import LlmClient
    from actors.diagnoser.llm.summary import Summarizer
    from actors.diagnoser.llm.usage import LlmMetrics

    cfg = rt.config.llm
    metrics = LlmMetrics(rt.metrics, cfg)
    client = LlmClient(cfg, metrics, key)
    redactor = rt.config.redaction.redactor()
    summarizer = Summarizer(cfg, client, rt.nc, redactor) if cfg.summaries else None
    return ClaudeDiagnoser(cfg, client, metrics, runbooks, rt.nc, redactor), summarizer


def spent_on(events: Sequence[msgspec.Raw | bytes]) -> float:
    """The model's estimated cost over an incident's recorded Diagnoses."""
    total = 0.0
    for raw in events:
        try:
            e = codec.decode(bytes(raw))
        except codec.DecodeError:
            continue
        if isinstance(e, Diagnosis):
            total += e.cost_usd
    return total


# The first diagnosis is on the loop's critical path: the monitor's log lines are worth
# this long at most (it answers from memory in a millisecond or two).
LOOKBACK_TIMEOUT_S = 0.25


class DiagnoserActor(Actor):
    name = "diagnoser"

    async def setup(self) -> None:
        self.memory = IncidentRecall(self.rt.nc)
        self.diagnoser, self.summarizer = make_diagnoser(self.rt, self.memory)
        log.info("diagnoser ready", extra={"source": self.diagnoser.source,
                                           "summaries": self.summarizer is not None})
        metrics = self.rt.metrics
        self.diagnoses = metrics.counter(
            "menders_diagnoses", "Diagnoses made, by source and outcome "
            "(actions, escalate, no_match)", ["source", "outcome"])
        self.latency = metrics.histogram(
            "menders_diagnosis_duration_seconds", "Time to diagnose one incident", ["source"])
        for name in self.config.subjects:
            if (definition := self._definition(name)) is not None:
                for problem in check_rules(definition.runbooks):
                    log.error("bad runbook rule", extra={"subject": name, "problem": problem})

    def _definition(self, subject: str) -> SubjectDefinition | None:
        return subjects.definition_for(self.config, subject)

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        if isinstance(event, IncidentResolved | IncidentEscalated):
            return await self._summarize(event)
        if isinstance(event, DiagnosisRequested):
            if not event.incident_id:
                raise Reject("a diagnosis request without an incident id")
            return await self._rediagnose(event)
        if not isinstance(event, IncidentOpened):
            raise Reject(f"the diagnoser takes incident.opened, resolved and escalated and "
                         f"diagnosis.requested only, not {type(event).__name__}")
        started = time.perf_counter()
        definition = self._definition(event.subject)
        if definition is None:
            diagnosis = no_match(event, f"no subject definition for {event.subject!r}: "
                                        "nothing to diagnose against")
        else:
            # Only the runbooks recall on the first diagnosis; Claude asks as a tool.
            if isinstance(self.diagnoser, RunbookDiagnoser):
                self.memory.prefetch(event)
            try:
                event = await self._with_recent_logs(event, definition)
                diagnosis = await self.diagnoser.diagnose(event, definition)
            finally:
                self.memory.forget(event.incident_id)
        diagnosis = msgspec.structs.replace(diagnosis, symptoms=dict(event.symptoms))
        return self._done(diagnosis, started)

    async def _with_recent_logs(self, incident: IncidentOpened,
                                definition: SubjectDefinition) -> IncidentOpened:
        """The incident carries the log lines of the scrape that opened it; a subject's
        last words often come earlier (etcd panics on its lost data dir while the
        invariant is still within its `for_s`). Add the monitor's lines since shortly
        before the break began (for_s + fresh_window_s ago: not so far back that an
        earlier, unrelated incident's lines creep in), oldest first, without repeats;
        without the monitor, the incident's own lines stand."""
        spec = next((s for s in definition.invariants if s.name == incident.invariant), None)
        for_s = spec.for_s if spec is not None else 0.0
        cfg = self.config.diagnoser
        window_s = max(for_s + cfg.fresh_window_s, 1.0)
        got = await self._ask_monitor(ObsQuery(subject=incident.subject, logs=LogsInput(
            limit=100, since_s=window_s)), timeout_s=min(cfg.fresh_timeout_s,
                                                         LOOKBACK_TIMEOUT_S))
        if got is None or not got.lines:
            return incident
        lines = list(dict.fromkeys([*got.lines, *incident.recent_logs]))[-MAX_LOG_LINES:]
        return msgspec.structs.replace(incident, recent_logs=lines)

    async def _rediagnose(self, req: DiagnosisRequested) -> Sequence[Event]:
        """A fresh diagnosis on fresh observations, knowing what was tried (issue 9)."""
        started = time.perf_counter()
        definition = self._definition(req.subject)
        incident, note = await self._fresh_incident(req, definition)
        if definition is None:
            diagnosis = no_match(incident, f"no subject definition for {req.subject!r}: "
                                           "nothing to diagnose against")
        else:
            # Rules cost nothing: only a model's diagnoser needs the incident's spend.
            spent = (await self._spent_usd(req.incident_id)
                     if self.diagnoser.source != "runbook" else 0.0)
            diagnosis = await self.diagnoser.diagnose(incident, definition, req.history,
                                                      spent)
            cfg = self.config.diagnoser
            diagnosis = exclude_tried(diagnosis, req.history, req.excluded, incident.symptoms,
                                      definition, cfg.evidence_factor, cfg.evidence_floor)
        evidence = [f"fresh look for attempt {req.attempt}: {req.reason}", note,
                    *diagnosis.evidence]
        diagnosis = msgspec.structs.replace(diagnosis, request_id=req.id,
                                            symptoms=dict(incident.symptoms),
                                            evidence=[e for e in evidence if e])
        return self._done(diagnosis, started)

    async def _spent_usd(self, incident_id: str) -> float:
        """What the model already cost on this incident, from the audit record (it
        survives a diagnoser restart). Unknown (the auditor does not answer) counts as
        spent: the runbooks answer rather than an uncapped model."""
        try:
            msg = await self.rt.nc.request(catalog.service_subject("auditor", "timeline"),
                                           incident_id.encode(),
                                           timeout=self.config.diagnoser.fresh_timeout_s)
            reply = msgspec.json.decode(msg.data, type=TimelineReply)
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as exc:
            log.warning("auditor not reachable: the model's spend on this incident is "
                        "unknown", extra={"err": repr(exc)})
            return float("inf")
        return spent_on(reply.events)

    async def _fresh_incident(self, req: DiagnosisRequested,
                              definition: SubjectDefinition | None
                              ) -> tuple[IncidentOpened, str]:
        """The incident as it looks now: the monitor's last few seconds of observations
        (mean per metric) and recent log lines; the request's symptoms if it cannot say."""
        cfg = self.config.diagnoser
        symptoms, logs, note = dict(req.symptoms), [], ""
        points = await self._ask_monitor(ObsQuery(subject=req.subject, observations=(
            ObservationsInput(since_s=max(cfg.fresh_window_s, 1.0), max_points=30))))
        fresh = [p for p in (points.points if points else []) if p.up]
        if fresh:
            sums: dict[str, list[float]] = {}
            for p in fresh:
                for k, v in p.metrics.items():
                    sums.setdefault(k, []).append(v)
            symptoms = {k: sum(vs) / len(vs) for k, vs in sums.items()}
            note = f"fresh symptoms: the mean of {len(fresh)} observation(s) of the last " \
                   f"{cfg.fresh_window_s:g}s"
        else:
            note = "no fresh observations from the monitor: the last known symptoms are used"
        lines = await self._ask_monitor(ObsQuery(subject=req.subject, logs=LogsInput(
            limit=100, since_s=max(cfg.fresh_window_s * 6, 1.0))))
        if lines is not None:
            logs = list(lines.lines)
        spec = next((s for s in definition.invariants if s.name == req.invariant), None) \
            if definition is not None else None
        value = symptoms.get(spec.metric, float("nan")) if spec is not None else float("nan")
        incident = IncidentOpened(id=req.id, incident_id=req.incident_id, causation_id=req.id,
                                  subject=req.subject, invariant=req.invariant,
                                  summary=req.reason[:200], value=value,
                                  threshold=spec.threshold if spec is not None else 0.0,
                                  symptoms=symptoms, recent_logs=logs)
        return incident, note

    async def _ask_monitor(self, q: ObsQuery, timeout_s: float = 0.0) -> ObsReply | None:
        method = "observations" if q.observations is not None else "logs"
        try:
            msg = await self.rt.nc.request(
                catalog.service_subject("monitor", method), msgspec.json.encode(q),
                timeout=timeout_s or self.config.diagnoser.fresh_timeout_s)
            reply = msgspec.json.decode(msg.data, type=ObsReply)
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as exc:
            log.warning("monitor not reachable for a fresh look", extra={"err": repr(exc)})
            return None
        return reply if reply.ok else None

    def _done(self, diagnosis: Diagnosis, started: float) -> Sequence[Event]:
        self.latency.labels(source=diagnosis.source).observe(time.perf_counter() - started)
        self.diagnoses.labels(source=diagnosis.source, outcome=_outcome(diagnosis)).inc()
        log.info("diagnosed", extra={"hypothesis": diagnosis.hypothesis[:200],
                                     "confidence": diagnosis.confidence,
                                     "actions": [a.action for a in diagnosis.actions],
                                     "escalate": diagnosis.escalate})
        return [diagnosis]

    async def _summarize(self, event: IncidentResolved | IncidentEscalated) -> Sequence[Event]:
        if self.summarizer is None or not event.incident_id:
            return ()  # no key: the record has no summaries, nothing else changes
        from actors.diagnoser.llm.client import LlmUnavailable

        try:
            summary = await self.summarizer.summarize(event)
        except LlmUnavailable as exc:
            # A summary is a convenience: the incident is recorded without one.
            log.warning("no incident summary", extra={"err": str(exc)[:300]})
            return ()
        return [summary]

    async def teardown(self) -> None:
        client = getattr(self.diagnoser, "client", None)
        if client is not None:
            await client.close()


def _outcome(d: Diagnosis) -> str:
    if d.confidence == 0.0 and not d.actions:
        return "no_match"
    return "escalate" if d.escalate else "actions"


ACTOR = DiagnoserActor
