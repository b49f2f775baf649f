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

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec
import nats.errors

import subjects
from actors.diagnoser.runbook import RunbookDiagnoser, no_match
from actors.runtime import Actor, Delivery, Reject, Runtime
from bus_schemas import catalog
from bus_schemas.messages import (
    Diagnosis,
    Event,
    IncidentEscalated,
    IncidentOpened,
    IncidentResolved,
)
from bus_schemas.queries import PastIncident, SimilarQuery, SimilarReply
from subjects.base import SubjectDefinition
from subjects.rules import check_rules

if TYPE_CHECKING:  # the anthropic SDK is imported only when a key is set: ~50 MB RSS
    from actors.diagnoser.llm.summary import Summarizer

log = logging.getLogger("menders.diagnoser")


class Diagnoser(Protocol):
    source: str

    async def diagnose(self, incident: IncidentOpened,
                       definition: SubjectDefinition) -> Diagnosis: ...


# The memory only reorders a runbook's alternatives: never worth stalling the loop for.
RECALL_TIMEOUT_S = 0.25


class _Memory:
    """The auditor's incident memory, asked over the bus; empty when it cannot answer."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def recall(self, incident: IncidentOpened) -> Sequence[PastIncident]:
        q = SimilarQuery(subject=incident.subject, invariant=incident.invariant,
                         symptoms=incident.symptoms, text=" ".join(incident.recent_logs[-20:]),
                         exclude=incident.incident_id)
        try:
            msg = await self.rt.nc.request(catalog.service_subject("auditor", "similar"),
                                           msgspec.json.encode(q), timeout=RECALL_TIMEOUT_S)
            reply = msgspec.json.decode(msg.data, type=SimilarReply)
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as exc:
            log.warning("incident memory not reachable", extra={"err": repr(exc)})
            return []
        return reply.similar


def make_diagnoser(rt: Runtime | None = None) -> tuple[Diagnoser, Summarizer | None]:
    """The diagnoser this process uses, and the summarizer when there is a key.

    With ANTHROPIC_API_KEY set: Claude (config.llm) with the runbooks as its
    fallback, so an API outage degrades to runbooks (source "claude->runbook").
    """
    runbooks = RunbookDiagnoser(_Memory(rt).recall if rt is not None else None)
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
    summarizer = Summarizer(cfg, client, rt.nc) if cfg.summaries else None
    return ClaudeDiagnoser(cfg, client, metrics, runbooks, rt.nc), summarizer


class DiagnoserActor(Actor):
    name = "diagnoser"

    async def setup(self) -> None:
        self.diagnoser, self.summarizer = make_diagnoser(self.rt)
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
        if not isinstance(event, IncidentOpened):
            raise Reject(f"the diagnoser takes incident.opened, resolved and escalated only, "
                         f"not {type(event).__name__}")
        started = time.perf_counter()
        definition = self._definition(event.subject)
        if definition is None:
            diagnosis = no_match(event, f"no subject definition for {event.subject!r}: "
                                        "nothing to diagnose against")
        else:
            diagnosis = await self.diagnoser.diagnose(event, definition)
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
