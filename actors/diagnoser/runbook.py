"""Runbook diagnosis: match a subject's runbook rules against an incident's symptoms.

Pure and subject-agnostic. A rule matches when its invariant is the broken one
(or any, when it names none), every `when` condition holds on the incident's
symptoms and every `log_contains` needle occurs in some recent log line. Log
lines and metrics are untrusted data: they are only compared (plain,
case-insensitive substring search on bounded text), never interpreted.

The best match is the highest confidence, then the most specific (most
conditions); the other matches' actions follow the best rule's as further
alternatives for the planner.

With an incident memory (`recall`), an action that verified before for the
same invariant and nearly the same symptoms is ranked first: experience
beats the rule's static order. A rule that asks for a human still wins.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from actors.runtime import follow_id
from bus_schemas.messages import (
    AttemptRecord,
    Diagnosis,
    IncidentOpened,
    RecommendedAction,
    RecommendedStep,
)
from bus_schemas.queries import PastIncident, verified_before
from subjects.base import ActionError, ActionSpec, RunbookRule, SubjectDefinition
from subjects.rules import ConditionError, match_condition

SOURCE = "runbook"
# Bounds on untrusted input: a flood of huge log lines must not stall a diagnosis.
MAX_LOG_LINES = 200
MAX_LINE_CHARS = 2000
EXCERPT_CHARS = 160

# Two-character operators first, so ">=0.5" is not read as ">" "=0.5".
@dataclass(frozen=True)
class RuleMatch:
    rule: RunbookRule
    evidence: tuple[str, ...]
    order: int  # position in the subject's runbooks: the last tie-break, for stability

    @property
    def specificity(self) -> int:
        return len(self.rule.when) + len(self.rule.log_contains)

    def rank_key(self) -> tuple[float, int, int]:
        return (-self.rule.confidence, -self.specificity, self.order)


def _bounded_logs(lines: Sequence[str]) -> list[str]:
    return [line[:MAX_LINE_CHARS] for line in lines[-MAX_LOG_LINES:]]


def _excerpt(line: str) -> str:
    # repr() quotes and escapes control characters: the excerpt stays inert data.
    text = line if len(line) <= EXCERPT_CHARS else line[:EXCERPT_CHARS] + "..."
    return repr(text)


def match_rule(rule: RunbookRule, invariant: str, symptoms: Mapping[str, float],
               logs: Sequence[str], order: int = 0) -> RuleMatch | None:
    """The rule's match with its evidence, or None. `logs` must already be bounded."""
    if rule.invariant is not None and rule.invariant != invariant:
        return None
    evidence = []
    for metric, cond in rule.when.items():
        value = symptoms.get(metric)
        try:
            if value is None or not match_condition(value, cond):
                return None
        except ConditionError:
            return None  # a broken rule never matches; check_rules reports it
        evidence.append(f"{metric}={value:g} (rule: {cond.strip()})")
    folded = [line.casefold() for line in logs]
    for needle in rule.log_contains:
        key = needle.casefold()
        hit = next((i for i, line in enumerate(folded) if key in line), None)
        if hit is None:
            return None
        evidence.append(f"log contains {needle!r}: {_excerpt(logs[hit])}")
    return RuleMatch(rule, tuple(evidence), order)


def rank(rules: Sequence[RunbookRule], invariant: str, symptoms: Mapping[str, float],
         logs: Sequence[str]) -> list[RuleMatch]:
    """Every matching rule, best first."""
    bounded = _bounded_logs(logs)
    matches = [m for i, rule in enumerate(rules)
               if (m := match_rule(rule, invariant, symptoms, bounded, i)) is not None]
    return sorted(matches, key=RuleMatch.rank_key)


def _canonical(params: dict[str, Any]) -> bytes:
    return msgspec.json.encode(params, order="sorted")


def vet_actions(candidates: Iterable[RecommendedAction],
                actions: Mapping[str, ActionSpec]) -> tuple[list[RecommendedAction], list[str]]:
    """Keep registered actions with valid params (normalised), drop duplicates; note the rest."""
    kept: list[RecommendedAction] = []
    notes: list[str] = []
    seen: set[tuple[str, bytes]] = set()
    for rec in candidates:
        if rec.steps:
            vetted = _vet_steps(rec, actions)
            if isinstance(vetted, str):
                notes.append(vetted)
                continue
            key = (rec.action, msgspec.json.encode(vetted, order="sorted"))
            if key not in seen:
                seen.add(key)
                kept.append(msgspec.structs.replace(rec, steps=vetted))
            continue
        spec = actions.get(rec.action)
        if spec is None:
            notes.append(f"dropped action {rec.action!r}: not registered for this subject")
            continue
        try:
            params = msgspec.to_builtins(spec.validate(rec.params))
        except ActionError as exc:
            notes.append(f"dropped action {rec.action!r}: {exc}")
            continue
        key = (rec.action, _canonical(params))
        if key in seen:
            continue
        seen.add(key)
        kept.append(RecommendedAction(action=rec.action, params=params, rationale=rec.rationale))
    return kept, notes


def _vet_steps(rec: RecommendedAction,
               actions: Mapping[str, ActionSpec]) -> list[RecommendedStep] | str:
    """A multi-step remedy is usable only whole: every step registered with valid params,
    unique ids, dependencies on its own steps. Else why it was dropped."""
    ids = [s.id for s in rec.steps]
    out: list[RecommendedStep] = []
    for s in rec.steps:
        why = ""
        spec = actions.get(s.action)
        if spec is None:
            why = f"{s.action!r} is not registered for this subject"
        elif not s.id or ids.count(s.id) > 1:
            why = f"step id {s.id!r} is empty or repeated"
        elif any(d not in ids for d in s.depends_on):
            why = f"step {s.id!r} depends on a step the remedy does not have"
        else:
            try:
                params = msgspec.to_builtins(spec.validate(s.params))
            except ActionError as exc:
                why = str(exc)
        if why:
            return f"dropped remedy {rec.action!r}: {why}"
        out.append(msgspec.structs.replace(s, params=params))
    return out


def observed_evidence(incident: IncidentOpened) -> str:
    return (f"invariant {incident.invariant} broken: {incident.value:g} "
            f"(threshold {incident.threshold:g})")


def no_match(incident: IncidentOpened, why: str, evidence: Sequence[str] = (),
             source: str = SOURCE) -> Diagnosis:
    """A diagnosis that hands the incident to a human: nothing the crew knows applies."""
    return diagnosis_of(incident, hypothesis=why, evidence=[observed_evidence(incident), *evidence],
                      confidence=0.0, actions=[], escalate=True, source=source)


def diagnosis_of(incident: IncidentOpened, **fields: Any) -> Diagnosis:
    # One deterministic id per incident event: a redelivered incident dedups in the stream.
    return Diagnosis(
        id=follow_id(incident, "diagnosis"),
        incident_id=incident.incident_id or incident.id,
        causation_id=incident.id,
        subject=incident.subject,
        invariant=incident.invariant,
        **fields,
    )


def diagnose(incident: IncidentOpened, definition: SubjectDefinition) -> Diagnosis:
    matches = rank(definition.runbooks, incident.invariant, incident.symptoms,
                   incident.recent_logs)
    if not matches:
        return no_match(incident, f"no runbook rule of {definition.kind} matched the broken "
                                  f"invariant {incident.invariant} and its symptoms")
    best = matches[0]
    evidence = [observed_evidence(incident),
                f"runbook rule {best.rule.name} matched (confidence {best.rule.confidence:g})",
                *best.evidence]
    evidence += [f"also matched: rule {m.rule.name} (confidence {m.rule.confidence:g})"
                 for m in matches[1:]]
    confidence = min(max(best.rule.confidence, 0.0), 1.0)
    if best.rule.escalate:
        return diagnosis_of(incident, hypothesis=best.rule.hypothesis, evidence=evidence,
                          confidence=confidence, actions=[], escalate=True, source=SOURCE)
    candidates = [a for m in matches if not m.rule.escalate for a in m.rule.actions]
    actions, notes = vet_actions(candidates, definition.actions)
    evidence += notes
    if not actions:
        evidence.append("no valid registered action left: a human must decide")
    return diagnosis_of(incident, hypothesis=best.rule.hypothesis, evidence=evidence,
                      confidence=confidence, actions=actions,
                      escalate=not actions, source=SOURCE)


def apply_memory(d: Diagnosis, incident: IncidentOpened, past: Sequence[PastIncident],
                 actions: Mapping[str, ActionSpec]) -> Diagnosis:
    """Rank first the action that verified for similar symptoms before."""
    if d.escalate and d.confidence > 0:
        return d  # a rule that asks for a human (no action restores it) wins
    for p in verified_before(past, incident.invariant, incident.symptoms):
        if d.actions and p.hypothesis != d.hypothesis:
            # Similar numbers, another diagnosis (slow replica vs cache off both raise
            # latency): experience reorders the fixes of the same cause, never overrides
            # the evidence that names a different one.
            continue
        if p.verified_steps:
            # A remedy of several steps verified: rank that remedy first where this
            # diagnosis proposes it; its first step alone never fixed anything.
            same = [a for a in d.actions if [s.action for s in a.steps] == p.verified_steps]
            if not same:
                continue
            first, rest = same[0], [a for a in d.actions if a is not same[0]]
        else:
            kept, _ = vet_actions([RecommendedAction(
                action=p.verified_action, params=p.verified_params,
                rationale=f"verified fix of similar incident {p.incident_id[:8]}")], actions)
            if not kept:
                continue  # the registry changed since: not usable any more
            first = kept[0]
            key = (first.action, _canonical(first.params))
            rest = [a for a in d.actions if (a.action, _canonical(a.params)) != key]
        note = (f"memory: incident {p.incident_id[:8]} of {p.invariant} with similar symptoms "
                f"was fixed by {first.action} (verified); ranked first")
        fields: dict[str, Any] = {"actions": [first, *rest], "evidence": [*d.evidence, note]}
        if not d.actions:  # no rule matched: experience is all there is
            fields.update(escalate=False, confidence=0.5,
                          hypothesis=f"like past incident {p.incident_id[:8]}: "
                                     f"{p.hypothesis or 'cause not recorded'}")
        return msgspec.structs.replace(d, **fields)
    return d


# --- a fresh look after failed attempts ------------------------------------------------


def broken_invariants(definition: SubjectDefinition, symptoms: Mapping[str, float]) -> set[str]:
    """The threshold invariants these symptoms break (a point-in-time check, no timers)."""
    out = set()
    for spec in definition.invariants:
        value = symptoms.get(spec.metric)
        if spec.kind != "threshold" or value is None or math.isnan(value):
            continue
        healthy = value < spec.threshold if spec.op == "<" else value > spec.threshold
        if not healthy:
            out.add(spec.name)
    return out


def evidence_metrics(definition: SubjectDefinition) -> set[str]:
    """The symptoms that count as evidence: those an invariant or a runbook condition names."""
    return ({s.metric for s in definition.invariants}
            | {metric for rule in definition.runbooks for metric in rule.when})


def evidence_changed(before: Mapping[str, float], after: Mapping[str, float],
                     definition: SubjectDefinition, factor: float, floor: float) -> str:
    """How the evidence changed between two sets of symptoms, or "" if it did not.

    Changed means: another set of broken invariants, or a symptom named by an invariant
    or a runbook condition moved by `factor` (values below `floor` count as `floor`, so
    noise around zero is no change). Unknown earlier symptoms count as unchanged.
    """
    if not before or not after:
        return ""
    was, now = broken_invariants(definition, before), broken_invariants(definition, after)
    if was != now:
        return (f"broken invariants were {', '.join(sorted(was)) or 'none'}, now "
                f"{', '.join(sorted(now)) or 'none'}")
    for metric in sorted(evidence_metrics(definition) & before.keys() & after.keys()):
        a, b = before[metric], after[metric]
        if math.isnan(a) or math.isnan(b):
            continue
        x, y = max(abs(a), floor), max(abs(b), floor)
        if max(x, y) / min(x, y) >= factor:
            return f"{metric} moved from {a:g} to {b:g}"
    return ""


def exclude_tried(d: Diagnosis, history: Sequence[AttemptRecord], excluded: Sequence[str],
                  symptoms: Mapping[str, float], definition: SubjectDefinition,
                  factor: float = 2.0, floor: float = 0.01) -> Diagnosis:
    """Drop actions a human refused, and actions tried and failed on this incident unless
    the evidence changed since (what `evidence_changed` says); the notes say why."""
    kept: list[RecommendedAction] = []
    notes: list[str] = []
    for rec in d.actions:
        if rec.action in excluded:
            notes.append(f"not proposing {rec.action}: refused for this incident")
            continue
        tried = [h for h in history if h.action == rec.action]
        if not tried:
            kept.append(rec)
            continue
        last = tried[-1]
        changed = evidence_changed(last.symptoms_before, symptoms, definition, factor, floor)
        if changed:
            kept.append(rec)
            notes.append(f"{rec.action} was tried (attempt {last.attempt}: {last.outcome}), "
                         f"but the evidence changed: {changed}")
        else:
            notes.append(f"not repeating {rec.action}: tried on this incident (attempt "
                         f"{last.attempt}: {last.outcome}) and the evidence has not changed")
    if not notes:
        return d
    return msgspec.structs.replace(d, actions=kept, evidence=[*d.evidence, *notes])


Recall = Callable[[IncidentOpened], Awaitable[Sequence[PastIncident]]]


class RunbookDiagnoser:
    """The `Diagnoser` that needs no network: the subject's own runbook rules,
    reordered by the incident memory when one is reachable (`recall`)."""

    source = SOURCE

    def __init__(self, recall: Recall | None = None) -> None:
        self.recall = recall

    async def diagnose(self, incident: IncidentOpened, definition: SubjectDefinition,
                       history: Sequence[AttemptRecord] = (),
                       spent_usd: float = 0.0) -> Diagnosis:
        # The history is applied by the caller (exclude_tried), the same for every
        # diagnoser; rules cost nothing, so the model's spend does not matter here.
        d = diagnose(incident, definition)
        if self.recall is None:
            return d
        return apply_memory(d, incident, await self.recall(incident), definition.actions)
