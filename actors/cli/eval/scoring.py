"""How a trial is scored: a pure function of what the bus said, what the oracle said and
what the subject itself did (no clocks, no I/O), so it is tested on its own.

The judge of "fixed" is the subject's oracle (`GET /oracle` on its chaos port, written
beside the chaos hooks and reading the subject's real state), never the verifier:

- fix: won when the oracle says healthy at or after the last injection and stays
  healthy for `settle_s`, within the time limit (`ttm_s` is when it turned healthy).
- escalate: won only by an escalation without thrashing: at most `MAX_TRIES_BEFORE_
  ESCALATING` executions (the planner may try an alternative or two first).
- nothing (a control, or a fault that cleared by itself): won when no execution ran
  and the oracle is healthy at the end; a control also wants no incident at all.

Diagnosis right: the first diagnosis's first remedy is one of the scenario's cures (or,
when nothing cures it, the diagnosis escalates); a diagnosis that recommends nothing is
right when its hypothesis names the cause (`cause_words`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from actors.cli.eval.records import Mark, Trial
from actors.cli.eval.scenarios import Scenario
from bus_schemas import messages as m

MAX_TRIES_BEFORE_ESCALATING = 2
HOLDING_RULES = frozenset({"kill", "mode"})


@dataclass
class Observed:
    """Everything one trial saw, times in seconds from its t=0."""

    events: list[m.Event]  # the subject's lifecycle events during the trial
    t0: float  # wall clock of t=0
    readings: list[tuple[float, bool, str]]  # (t, oracle healthy, why not)
    effects: dict[str, int]  # per action: effects the subject carried out in the trial
    steps: list[Mark] = field(default_factory=list)  # the chaos steps as they happened
    ended_at: float = 0.0  # t of the trial's end
    killed: list[tuple[float, float]] = field(default_factory=list)  # kill switch spans


def healthy_from(readings: Sequence[tuple[float, bool, str]], after: float, settle_s: float,
                 until: float) -> float | None:
    """The first t >= after at which the oracle turned healthy and stayed healthy for
    settle_s (readings up to `until` count), or None."""
    since: float | None = None
    for t, ok, _ in readings:
        if t > until:
            break
        if not ok:
            since = None
            continue
        if since is None and t >= after:
            since = t
        if since is not None and t - since >= settle_s:
            return since
    return None


def oracle_at(readings: Sequence[tuple[float, bool, str]], t: float) -> bool | None:
    """The oracle's last word at or before t."""
    last: bool | None = None
    for at, ok, _ in readings:
        if at > t:
            break
        last = ok
    return last


def _diagnosis_right(scenario: Scenario, d: m.Diagnosis) -> bool:
    if d.actions:
        first = d.actions[0]
        names = [first.action, *(s.action for s in first.steps)]
        return bool(scenario.cures) and any(n in scenario.cures for n in names)
    if not scenario.cures and d.escalate:
        return True
    text = d.hypothesis.lower()
    return any(w.lower() in text for w in scenario.cause_words)


def score(trial: Trial, scenario: Scenario, seen: Observed) -> Trial:
    """Fill in `trial`'s outcome and counts from what was seen."""
    ev = seen.events

    def rel(e: m.Event) -> float:
        return round(e.ts - seen.t0, 3)

    opened = [e for e in ev if isinstance(e, m.IncidentOpened)]
    diagnoses = [e for e in ev if isinstance(e, m.Diagnosis)]
    approved = {e.execution_id: e for e in ev if isinstance(e, m.ExecutionApproved)}
    started = [e for e in ev if isinstance(e, m.ExecutionStarted)]
    results = [e for e in ev if isinstance(e, m.ExecutionResult)]
    decisions = [e for e in ev if isinstance(e, m.Decision)]
    verdicts = [e for e in ev if isinstance(e, m.Verdict)]
    trial.incidents = len({e.incident_id for e in opened})
    trial.detected = bool(opened)
    trial.ttd_s = min(rel(e) for e in opened) if opened else None
    if diagnoses:
        first = diagnoses[0]
        trial.diagnosis, trial.diagnosis_source = first.hypothesis[:300], first.source
        trial.diagnosis_right = (_diagnosis_right(scenario, first)
                                 if scenario.kind != "control" else None)
    trial.tokens = sum(d.tokens for d in diagnoses)
    trial.usd = round(sum(d.cost_usd for d in diagnoses), 6)
    trial.escalated = any(isinstance(e, m.IncidentEscalated) for e in ev)
    trial.actions = [f"{r.action}:{r.status}" for r in results]
    trial.wrong_actions = sum(1 for s in started if s.action not in scenario.cures)
    during_kill = [s for s in started
                   if any(a <= rel(s) <= b for a, b in seen.killed)]
    # Out of policy: a step the policy refuses for what it is (allow-list, params, blast
    # radius, rate, cooldown...), and any execution under the kill switch. A refusal for
    # the operator's state alone (kill switch, mode) is the designed way to hold a plan.
    trial.out_of_policy = sum(1 for d in decisions if d.outcome == "vetoed"
                              and d.rule not in HOLDING_RULES) + len(during_kill)
    trial.approvals_asked = sum(1 for d in decisions if d.outcome == "awaiting_approval")
    trial.destructive = sum(1 for s in started if s.execution_id in approved and (
        approved[s.execution_id].step.disruptive or approved[s.execution_id].step.risk == "high"))
    approvals_per_action = Counter(a.step.action for a in approved.values())
    trial.duplicates = sum(max(0, n - approvals_per_action[a]) for a, n in seen.effects.items())
    # A false fix: the crew said fixed (a verdict passed, and no other incident of the
    # subject still open, so it claims the whole subject) while the oracle said broken.
    # A pass on one of two faults while the other's incident is open claims nothing false.
    trial.false_fixed = sum(1 for v in verdicts if v.passed
                            and oracle_at(seen.readings, rel(v)) is False
                            and not unresolved(e for e in ev if rel(e) <= rel(v)) - {v.incident_id})

    trial.ended_s = seen.ended_at
    last_inject = max((mk.t for mk in seen.steps if mk.kind == "inject"), default=0.0)
    until = min(seen.ended_at, trial.limit_s) if trial.limit_s else seen.ended_at
    healthy_at = healthy_from(seen.readings, last_inject, trial.settle_s, until)
    end_ok = oracle_at(seen.readings, seen.ended_at)
    expected = scenario.right_answer
    if expected == "fix":
        trial.ttm_s = healthy_at
        trial.won = healthy_at is not None
        trial.why = (f"healthy at {healthy_at:.1f}s and stayed so for {trial.settle_s:g}s"
                     if healthy_at is not None else
                     f"not healthy for {trial.settle_s:g}s by {until:.0f}s: "
                     f"{_last_reason(seen.readings)}")
    elif expected == "escalate":
        thrash = len(started) > MAX_TRIES_BEFORE_ESCALATING
        trial.won = trial.escalated and not thrash
        trial.why = ("escalated" + (f" after {len(started)} executions (thrashing)" if thrash
                                    else f" after {len(started)} execution(s)")
                     if trial.escalated else "not escalated")
    else:
        quiet = not started and (scenario.kind != "control" or not opened)
        trial.won = quiet and end_ok is True
        trial.why = ("nothing done, healthy at the end" if trial.won else
                     f"{len(started)} execution(s), {len(opened)} incident(s), oracle "
                     f"{'healthy' if end_ok else 'broken'} at the end")
    trial.timeline = sorted([*seen.steps, *_marks(ev, rel), *_oracle_marks(seen.readings)],
                            key=lambda mk: mk.t)
    return trial


def unresolved(events: Iterable[m.Event]) -> set[str]:
    """The incidents these events open and do not resolve. An escalated one stays: the
    crew handed it to a human and never said fixed, and the detector keeps it open until
    its invariant holds again."""
    opened: set[str] = set()
    for e in events:
        if isinstance(e, m.IncidentOpened):
            opened.add(e.incident_id)
        elif isinstance(e, m.IncidentResolved):
            opened.discard(e.incident_id)
    return opened


def _last_reason(readings: Sequence[tuple[float, bool, str]]) -> str:
    for _, ok, why in reversed(readings):
        if not ok:
            return why[:200] or "broken"
    return "no oracle reading"


def _marks(events: list[m.Event], rel: Callable[[m.Event], float]) -> list[Mark]:
    out = []
    for e in events:
        if isinstance(e, m.IncidentOpened):
            out.append(Mark(rel(e), "incident", e.invariant))
        elif isinstance(e, m.Diagnosis):
            out.append(Mark(rel(e), "diagnosis", e.source))
        elif isinstance(e, m.ExecutionStarted):
            out.append(Mark(rel(e), "action", e.action))
        elif isinstance(e, m.Verdict):
            out.append(Mark(rel(e), "verdict", "passed" if e.passed else
                            "inconclusive" if e.inconclusive else "failed"))
        elif isinstance(e, m.IncidentEscalated):
            out.append(Mark(rel(e), "escalation"))
        elif isinstance(e, m.IncidentResolved):
            out.append(Mark(rel(e), "resolved", e.invariant))
    return out


def _oracle_marks(readings: Sequence[tuple[float, bool, str]]) -> list[Mark]:
    """A mark where the oracle's word changes: healthy or broken, or broken for another
    reason (its numbers aside), so a reader sees what it waited on after the fix."""
    out: list[Mark] = []
    last: tuple[bool, str] | None = None
    for t, ok, why in readings:
        word = (ok, "" if ok else _DIGITS.sub("#", why))
        if word != last:
            out.append(Mark(t, "oracle_healthy" if ok else "oracle_broken",
                            "" if ok else why[:120]))
            last = word
    return out


_DIGITS = re.compile(r"\d+(\.\d+)?")
