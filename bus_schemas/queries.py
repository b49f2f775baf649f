"""The read-only query services: each request and each reply, one Struct apiece.

Two services answer over core request/reply (catalog.SERVICES, methods in
catalog.QUERY_METHODS): the monitor (`observations`, `logs`: what it saw of a
subject lately) and the auditor (`timeline`, `incidents`, `similar`: the
record and the incident memory). The Claude diagnoser's investigation tools
take the monitor's inputs as their input schemas (msgspec.json.schema), so
the wire format and the tool definitions have one source.

Every reply carries `ok` and `error`, so a failure decodes with any reply type.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import msgspec

MAX_POINTS = 120
MAX_LINES = 200
HISTORY_S = 15 * 60  # the monitor keeps this much (the observation stream's max age)
MAX_REPLY_EVENTS = 500  # a timeline reply stays well under the server's 1 MB max_payload


# --- the monitor's service -------------------------------------------------------


class ObservationsInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Recent observations of the incident's subject, oldest first."""

    since_s: Annotated[float, msgspec.Meta(ge=1, le=HISTORY_S,
                                           description="how far back, in seconds")] = 300
    until_s: Annotated[float, msgspec.Meta(ge=0, le=HISTORY_S,
                                           description="stop this many seconds ago")] = 0
    metrics: Annotated[list[str], msgspec.Meta(
        max_length=32, description="only these metrics (all when empty)")] = []
    max_points: Annotated[int, msgspec.Meta(ge=1, le=MAX_POINTS)] = 30


class LogsInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Recent log lines of the incident's subject, oldest first."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LINES)] = 50
    contains: Annotated[str, msgspec.Meta(max_length=200, description=
                                          "only lines containing this text (any case)")] = ""
    since_s: Annotated[float, msgspec.Meta(ge=1, le=HISTORY_S)] = 600


class ObsQuery(msgspec.Struct, frozen=True, kw_only=True):
    """A request to the monitor: one input plus the subject the diagnoser fixed."""

    subject: str
    observations: ObservationsInput | None = None
    logs: LogsInput | None = None


class ObsPoint(msgspec.Struct, frozen=True, kw_only=True):
    ts: float
    up: bool
    metrics: dict[str, float] = {}
    error: str = ""


class ObsReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    ok: bool
    error: str = ""
    points: list[ObsPoint] = []
    lines: list[str] = []
    truncated: bool = False


# --- the auditor's service ------------------------------------------------------


class PastIncident(msgspec.Struct, frozen=True, kw_only=True):
    """One closed incident as the incident memory keeps it."""

    incident_id: str
    subject: str
    invariant: str
    opened_at: float = 0.0
    closed_at: float = 0.0
    outcome: str = ""  # resolved | escalated
    symptoms: dict[str, float] = {}
    hypothesis: str = ""
    source: str = ""  # the diagnoser that made the diagnosis
    tried: list[str] = []  # "action:status", in order
    verified_action: str = ""  # the action whose plan passed its verdict
    verified_params: dict[str, Any] = {}
    # For a plan of several steps, their actions in order (verified_action is then its
    # first step's): the fix was the whole remedy, never its first step alone.
    verified_steps: list[str] = []
    escalation: str = ""
    summary: str = ""
    score: float = 0.0  # in query answers: bm25, lower is more similar


class SimilarQuery(msgspec.Struct, frozen=True, kw_only=True):
    """The `similar` request: past incidents like this one."""

    subject: str
    invariant: str = ""
    symptoms: dict[str, float] = {}
    text: str = ""  # free words (log lines, a hypothesis): untrusted, only tokenised
    exclude: str = ""  # an incident id to leave out: the one being diagnosed
    limit: int = 5


class SimilarReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    ok: bool
    error: str = ""
    similar: list[PastIncident] = []


class TimelineReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The `timeline` reply: the recorded events (raw, as published), oldest first."""

    ok: bool
    error: str = ""
    incident_id: str = ""
    events: list[msgspec.Raw] = []
    truncated: bool = False


class IncidentRow(msgspec.Struct, kw_only=True):
    incident_id: str
    subject: str
    invariant: str
    opened: float  # ts of its first recorded event
    # open | escalated (still broken) | resolved | escalated, then resolved |
    # resolved, then escalated
    outcome: str
    events: int


class IncidentsReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The `incidents` reply: the latest incidents (`open` as the argument: open ones only)."""

    ok: bool
    error: str = ""
    incidents: list[IncidentRow] = []


AuditReply = SimilarReply | TimelineReply | IncidentsReply


# --- what "similar symptoms" means, for the memory that ranks and the runbook that checks --


def bucket(value: float) -> str:
    """A coarse, order-of-magnitude bucket: r0..r4 for ratios, e<n> above 1."""
    if not math.isfinite(value):
        return "nan"
    if value == 0:
        return "zero"
    if value < 0:
        return "neg"
    if value <= 1.0:
        return f"r{min(int(value * 5), 4)}"
    return f"e{int(math.log10(value))}"


def symptom_tokens(symptoms: Mapping[str, float]) -> list[str]:
    return [f"{name}_{bucket(float(v))}" for name, v in sorted(symptoms.items())
            if re.fullmatch(r"[A-Za-z0-9_]{1,64}", name)]


def symptom_similarity(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Jaccard similarity of the bucketed symptoms: 1.0 for the same shape."""
    ta, tb = set(symptom_tokens(a)), set(symptom_tokens(b))
    return len(ta & tb) / len(ta | tb) if ta | tb else 0.0


def verified_before(past: Iterable[PastIncident], invariant: str,
                    symptoms: Mapping[str, float], min_similarity: float = 0.7
                    ) -> list[PastIncident]:
    """Past incidents of the same invariant, with nearly the same symptoms, whose fix
    verified; in the order given (most similar first)."""
    return [p for p in past if p.invariant == invariant and p.verified_action
            and symptom_similarity(p.symptoms, symptoms) >= min_similarity]
