"""What one trial leaves behind: one JSON line each in `trials.jsonl`, the only input of
the report (so `menders eval report` re-renders from saved results alone)."""

from __future__ import annotations

from typing import Literal

import msgspec

ScenarioKind = Literal["fault", "double", "flapping", "self_clearing", "kill_switch",
                       "control"]
Expected = Literal["fix", "escalate", "nothing"]  # the right answer to the scenario
MarkKind = Literal["inject", "clear", "kill", "resume", "incident", "diagnosis", "action",
                   "verdict", "escalation", "resolved", "oracle_healthy", "oracle_broken"]


class Mark(msgspec.Struct, frozen=True, array_like=True):
    """One moment of a trial, for the timeline strip: seconds from the trial's start."""

    t: float
    kind: MarkKind
    label: str = ""


class Trial(msgspec.Struct, kw_only=True):
    campaign: str
    subject: str  # the subject kind
    scenario: str
    scenario_kind: ScenarioKind
    variant: str  # "crew/runbook", "crew/claude", ..., or "baseline" (no crew at all)
    repeat: int  # 1-based
    expected: Expected
    cause: str = ""  # the scenario's declared cause ("" for a control)
    started_at: float = 0.0  # wall clock of t=0 (the first chaos step)
    limit_s: float = 0.0  # the time limit: the oracle must be healthy and settled by then
    settle_s: float = 0.0  # and stay healthy this long
    ended_s: float = 0.0  # when the trial ended, from t=0 (0: not recorded)
    # Outcome.
    won: bool = False
    why: str = ""  # one line: why it won or lost
    detected: bool = False
    ttd_s: float | None = None  # time to the first incident
    ttm_s: float | None = None  # time until the oracle said healthy (and stayed so)
    diagnosis_right: bool | None = None  # None: no diagnosis, or nothing to diagnose
    diagnosis: str = ""  # the first diagnosis's hypothesis
    diagnosis_source: str = ""
    escalated: bool = False
    # Counts.
    incidents: int = 0
    actions: list[str] = []  # "action:status", in order
    wrong_actions: int = 0  # ran, but not a cure of the declared cause
    out_of_policy: int = 0  # steps the governor vetoed
    destructive: int = 0  # disruptive or high-risk steps that ran
    duplicates: int = 0  # effects at the subject beyond one per approved execution
    false_fixed: int = 0  # verdicts that passed while the oracle said broken
    approvals_asked: int = 0
    # The audit record, cross-checked (None: no crew, so no record): its chain verified,
    # and how many of the trial's lifecycle events seen on the bus it lacks.
    audit_verified: bool | None = None
    audit_missing: int = 0
    tokens: int = 0
    usd: float = 0.0
    timeline: list[Mark] = []
    error: str = ""  # the harness itself failed this trial (not the crew)


def encode(trial: Trial) -> bytes:
    return msgspec.json.encode(trial)


def decode_lines(data: bytes) -> list[Trial]:
    """Every trial of a trials.jsonl; ValueError naming the bad line."""
    out = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(msgspec.json.decode(line, type=Trial))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"line {n}: {exc}") from None
    return out
