"""Read-only investigation over the bus: what the Claude diagnoser may look at.

Four tools, each a plain query (nothing here can write, run a command or
reach a subject's endpoints):

  recent_observations  the monitor's recent snapshots of the incident's subject
  recent_logs          the monitor's recent log lines of that subject
  similar_incidents    the auditor's incident memory
  action_registry      the subject's registered actions (from its definition)

The managed subject is fixed by the diagnoser, never chosen by the model, so
an investigation cannot wander to other subjects. The monitor's query Structs
(bus_schemas.queries) are its service's wire format and the tools' input
schemas at once (msgspec.json.schema), so there is one source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import nats.errors
from nats.aio.client import Client

from bus_schemas import catalog
from bus_schemas.errors import MendersError
from bus_schemas.messages import IncidentOpened
from bus_schemas.queries import (
    LogsInput,
    ObservationsInput,
    ObsQuery,
    ObsReply,
    PastIncident,
    SimilarQuery,
    SimilarReply,
)
from subjects.base import SubjectDefinition

QUERY_TIMEOUT_S = 3.0


class SimilarInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Closed past incidents of this subject with similar symptoms, most similar first."""

    text: Annotated[str, msgspec.Meta(max_length=500, description=
                                      "extra words to match (error names, components)")] = ""
    limit: Annotated[int, msgspec.Meta(ge=1, le=10)] = 5


class RegistryInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The subject's registered actions: names, parameter schemas, risk, idempotency."""


class ToolError(MendersError):
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

