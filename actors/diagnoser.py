"""The diagnoser actor: one Diagnosis per opened incident.

How a diagnosis is made sits behind the `Diagnoser` protocol, so the actor
does not care whether runbook rules or Claude produced it. Whatever a
diagnoser proposes is only a proposal: the planner takes registered actions
only, and the governor judges every step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import subjects
from actors.runbook import RunbookDiagnoser, check_rules, no_match
from actors.runtime import Actor, Delivery, Reject
from bus_schemas.messages import Diagnosis, Event, IncidentOpened
from subjects.base import SubjectDefinition

log = logging.getLogger("menders.diagnoser")


class Diagnoser(Protocol):
    source: str

    async def diagnose(self, incident: IncidentOpened,
                       definition: SubjectDefinition) -> Diagnosis: ...


def make_diagnoser() -> Diagnoser:
    """The diagnoser this process uses.

    The Claude diagnoser goes here: when ANTHROPIC_API_KEY is set, build it
    (from config.llm) with this RunbookDiagnoser as its fallback, so an API
    outage degrades to runbooks (source "claude->runbook fallback").
    """
    return RunbookDiagnoser()


class DiagnoserActor(Actor):
    name = "diagnoser"

    async def setup(self) -> None:
        self.diagnoser = make_diagnoser()
        self._definitions: dict[str, SubjectDefinition] = {}
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
        cfg = self.config.subjects.get(subject)
        kind = cfg.kind if cfg is not None else subject
        if kind not in self._definitions:
            try:
                self._definitions[kind] = subjects.load(kind)
            except KeyError:
                return None
        return self._definitions[kind]

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        if not isinstance(event, IncidentOpened):
            raise Reject(f"the diagnoser takes incident.opened only, not {type(event).__name__}")
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


def _outcome(d: Diagnosis) -> str:
    if d.confidence == 0.0 and not d.actions:
        return "no_match"
    return "escalate" if d.escalate else "actions"


ACTOR = DiagnoserActor
