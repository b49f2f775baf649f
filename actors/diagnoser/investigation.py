"""Read-only investigation over the bus: what the Claude diagnoser may look at.

Four tools, each a plain query (nothing here can write, run a command or
reach a subject's endpoints):

  recent_observations  the monitor's recent snapshots of the incident's subject
  recent_logs          the monitor's recent log lines of that subject
  similar_incidents    the auditor's incident memory
  action_registry      the subject's registered actions (from its definition)

The managed subject is fixed by the diagnoser, never chosen by the model, so
an investigation cannot wander to other subjects. The query Structs below are
the wire format of the monitor's `menders.query.obs.*` service and the tools'
input schemas at once (msgspec.json.schema), so there is one source.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import nats.errors
from nats.aio.client import Client

from actors.auditor.memory import PastIncident, SimilarQuery
from bus_schemas import catalog
from bus_schemas.messages import IncidentOpened, Observation
from subjects.base import SubjectDefinition

QUERY_TIMEOUT_S = 3.0
MAX_POINTS = 120
MAX_LINES = 200
HISTORY_S = 15 * 60  # the monitor keeps this much (the observation stream's max age)


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


class SimilarInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Closed past incidents of this subject with similar symptoms, most similar first."""

    text: Annotated[str, msgspec.Meta(max_length=500, description=
                                      "extra words to match (error names, components)")] = ""
    limit: Annotated[int, msgspec.Meta(ge=1, le=10)] = 5


class RegistryInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The subject's registered actions: names, parameter schemas, risk, idempotency."""


class ObsQuery(msgspec.Struct, frozen=True, kw_only=True):
    """The monitor's query: a tool input plus the subject the diagnoser fixed."""

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


class SimilarReply(msgspec.Struct, kw_only=True):
    ok: bool
    error: str = ""
    similar: list[PastIncident] = []


# --- the monitor's side -----------------------------------------------------------


class History:
    """What the monitor saw of one subject lately: observations and log lines."""

    def __init__(self, max_obs: int = 900, max_lines: int = 2000) -> None:
        self.obs: deque[Observation] = deque(maxlen=max_obs)
        self.lines: deque[tuple[float, str]] = deque(maxlen=max_lines)

    def add(self, obs: Observation) -> None:
        self.obs.append(obs)
        self.lines.extend((obs.ts, line) for line in obs.log_lines)

    def observations(self, q: ObservationsInput, now: float) -> ObsReply:
        lo, hi = now - q.since_s, now - q.until_s
        chosen = [o for o in self.obs if lo <= o.ts <= hi]
        step = max(1, -(-len(chosen) // q.max_points))  # ceil: evenly spaced, newest kept
        picked = chosen[::-1][::step][::-1]
        wanted = set(q.metrics)
        points = [ObsPoint(ts=round(o.ts, 3), up=o.up, error=o.error,
                           metrics={k: v for k, v in o.metrics.items()
                                    if not wanted or k in wanted})
                  for o in picked]
        return ObsReply(ok=True, points=points, truncated=step > 1)

    def logs(self, q: LogsInput, now: float) -> ObsReply:
        needle = q.contains.casefold()
        found = [line for ts, line in self.lines
                 if ts >= now - q.since_s and needle in line.casefold()]
        return ObsReply(ok=True, lines=found[-q.limit:], truncated=len(found) > q.limit)


def answer_obs_query(histories: dict[str, History], data: bytes, now: float) -> ObsReply:
    try:
        q = msgspec.json.decode(data, type=ObsQuery)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return ObsReply(ok=False, error=f"bad query: {exc}")
    history = histories.get(q.subject)
    if history is None:
        return ObsReply(ok=False, error=f"subject {q.subject!r} is not watched by this monitor")
    if q.observations is not None:
        return history.observations(q.observations, now)
    if q.logs is not None:
        return history.logs(q.logs, now)
    return ObsReply(ok=False, error="the query asks for neither observations nor logs")


# --- the diagnoser's side ----------------------------------------------------------


class ToolError(Exception):
    """A tool call that cannot be answered: its text goes back to the model."""


TOOL_INPUTS: dict[str, type[msgspec.Struct]] = {
    "recent_observations": ObservationsInput,
    "recent_logs": LogsInput,
    "similar_incidents": SimilarInput,
    "action_registry": RegistryInput,
}


def tool_definitions() -> list[dict[str, Any]]:
    """The investigation tools for the Messages API, schemas from the Structs."""
    tools = []
    for name, struct in TOOL_INPUTS.items():
        schema = msgspec.json.schema(struct)
        tools.append({"name": name, "description": (struct.__doc__ or "").strip(),
                      "input_schema": _inline(schema)})
    return tools


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """msgspec puts a top-level Struct under $defs; tool schemas want it inline."""
    ref = schema.get("$ref", "")
    defs = schema.get("$defs", {})
    if ref.startswith("#/$defs/"):
        body = dict(defs[ref.removeprefix("#/$defs/")])
        rest = {k: v for k, v in defs.items() if k != ref.removeprefix("#/$defs/")}
        if rest:
            body["$defs"] = rest
        body.pop("title", None)
        return body
    return schema


def registry_of(definition: SubjectDefinition) -> list[dict[str, Any]]:
    return [{"name": s.name, "description": s.description, "risk": s.risk,
             "idempotent": s.idempotent, "params_schema": _inline(s.json_schema())}
            for s in definition.actions.values()]


class Investigator:
    """Answers the model's tool calls for one incident, over NATS request/reply."""

    def __init__(self, nc: Client | None, incident: IncidentOpened,
                 definition: SubjectDefinition, timeout_s: float = QUERY_TIMEOUT_S) -> None:
        self.nc = nc
        self.incident = incident
        self.definition = definition
        self.timeout_s = timeout_s

    async def call(self, name: str, raw_input: object) -> Any:
        """The tool's answer (plain data); ToolError for any input or service problem."""
        struct = TOOL_INPUTS.get(name)
        if struct is None:
            raise ToolError(f"unknown tool {name!r}; tools: {', '.join(TOOL_INPUTS)}")
        try:
            args = msgspec.convert(raw_input, struct)
        except msgspec.ValidationError as exc:
            raise ToolError(f"invalid input for {name}: {exc}") from None
        if isinstance(args, RegistryInput):
            return registry_of(self.definition)
        if isinstance(args, SimilarInput):
            past = await self.similar(args.text, args.limit)
            return [msgspec.to_builtins(p) for p in past]
        query = ObsQuery(subject=self.incident.subject,
                         observations=args if isinstance(args, ObservationsInput) else None,
                         logs=args if isinstance(args, LogsInput) else None)
        method = "observations" if query.observations is not None else "logs"
        reply = await self._request(catalog.service_subject("monitor", method),
                                    msgspec.json.encode(query), ObsReply)
        if not reply.ok:
            raise ToolError(reply.error)
        return msgspec.to_builtins(reply)

    async def similar(self, text: str = "", limit: int = 5) -> Sequence[PastIncident]:
        inc = self.incident
        q = SimilarQuery(subject=inc.subject, invariant=inc.invariant, symptoms=inc.symptoms,
                         text=" ".join([text, *inc.recent_logs[-20:]]),
                         exclude=inc.incident_id, limit=limit)
        reply = await self._request(catalog.service_subject("auditor", "similar"),
                                    msgspec.json.encode(q), SimilarReply)
        if not reply.ok:
            raise ToolError(reply.error)
        return reply.similar

    async def _request(self, subject: str, payload: bytes, into: type[Any]) -> Any:
        if self.nc is None:
            raise ToolError("no bus connection")
        try:
            msg = await self.nc.request(subject, payload, timeout=self.timeout_s)
        except nats.errors.NoRespondersError:
            raise ToolError(f"nobody answers {subject} right now") from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise ToolError(f"{subject} did not answer within {self.timeout_s:g}s") from None
        try:
            return msgspec.json.decode(msg.data, type=into)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ToolError(f"unreadable answer from {subject}: {exc}") from None

