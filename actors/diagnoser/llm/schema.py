"""The final diagnosis: a tool whose input schema comes from a msgspec Struct.

The schema the model sees restricts `action` to the subject's registered
action names (an enum built per subject with `Literal`). Its answer is then
decoded against the same shape with `action: str`, so an unregistered action
is not a decode failure that loses the whole diagnosis but a named refusal in
the evidence, and every kept action's parameters pass `ActionSpec.validate`
(runbook.vet_actions) before anything leaves the diagnoser.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

import msgspec

from actors.diagnoser.llm.prompt import DIAGNOSIS_TOOL
from actors.diagnoser.runbook import vet_actions
from bus_schemas.errors import MendersError
from bus_schemas.messages import RecommendedAction, RecommendedStep, StepMode
from subjects.base import SubjectDefinition

Text = Annotated[str, msgspec.Meta(max_length=600)]


Params = Annotated[dict[str, Any], msgspec.Meta(
    description="parameters matching the action's schema in the registry")]
StepId = Annotated[str, msgspec.Meta(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_-]+$")]
MAX_STEPS = 8


@cache
def final_struct(action_type: Any) -> type[msgspec.Struct]:
    """The FinalDiagnosis Struct with `action` typed as given (an enum, or str)."""
    step = msgspec.defstruct(
        "ProposedStep",
        [("id", StepId), ("action", action_type), ("params", Params, {}),
         ("depends_on", Annotated[list[StepId], msgspec.Meta(
             max_length=MAX_STEPS, description="ids of steps that must succeed first")], []),
         ("mode", Annotated[StepMode, msgspec.Meta(
             description="sync: later waves wait for it; async: only its dependents "
                         "do; fire_and_forget: a note that nothing waits on")], "sync")],
        kw_only=True, forbid_unknown_fields=True)
    proposed = msgspec.defstruct(
        "ProposedAction",
        [("action", Annotated[action_type, msgspec.Meta(
            description="the registered action; for a remedy of several steps, the "
                        "action of its first step")]),
         ("params", Params, {}),
         ("rationale", Text, ""),
         ("remedy", Annotated[str, msgspec.Meta(
             max_length=60, description="with steps: a short name for the remedy")], ""),
         ("steps", Annotated[list[step], msgspec.Meta(  # type: ignore[valid-type]
             max_length=MAX_STEPS, description="a repair of several registered actions, "
             "run as one plan in waves (each step after its depends_on); empty for one "
             "action")], [])],
        kw_only=True, forbid_unknown_fields=True)
    return msgspec.defstruct(
        "FinalDiagnosis",
        [("hypothesis", Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]),
         ("evidence", Annotated[list[Text], msgspec.Meta(max_length=20)]),
         ("confidence", Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]),
         ("actions", Annotated[list[proposed], msgspec.Meta(  # type: ignore[valid-type]
             max_length=5, description="registered actions, best first")], []),
         ("escalate", bool, False)],
        kw_only=True, forbid_unknown_fields=True)


def diagnosis_tool(definition: SubjectDefinition) -> dict[str, Any]:
    names = tuple(sorted(definition.actions))
    action_type = Literal[names] if names else str
    schema = msgspec.json.schema(final_struct(action_type))
    return {
        "name": DIAGNOSIS_TOOL,
        "description": "Submit the final diagnosis: hypothesis, evidence, confidence 0..1, "
                       "recommended registered actions (best first), or escalate=true "
                       "when no registered action can fix the cause.",
        "input_schema": _inline(schema),
    }


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    defs = dict(schema.get("$defs", {}))
    body = dict(defs.pop("FinalDiagnosis"))
    body.pop("title", None)
    if defs:
        body["$defs"] = defs
    return body


@dataclass(frozen=True)
class Final:
    hypothesis: str
    evidence: list[str]
    confidence: float
    actions: list[RecommendedAction]
    escalate: bool
    refusals: list[str]  # proposals dropped on arrival, and why


def _recommended(a: Any) -> RecommendedAction:
    """One proposal as the planner takes it: a single action, or a named remedy whose
    steps the diagnoser vets whole (runbook.vet_actions)."""
    if not a.steps:
        return RecommendedAction(action=a.action, params=a.params, rationale=a.rationale)
    return RecommendedAction(
        action=a.remedy or f"{a.action}_and_more", rationale=a.rationale,
        steps=[RecommendedStep(id=s.id, action=s.action, params=s.params,
                               depends_on=list(s.depends_on), mode=s.mode) for s in a.steps])


class InvalidDiagnosis(MendersError, ValueError):
    """The tool input does not match the schema: the text goes back to the model."""


def parse_final(raw: object, definition: SubjectDefinition) -> Final:
    try:
        got: Any = msgspec.convert(raw, final_struct(str))
    except msgspec.ValidationError as exc:
        raise InvalidDiagnosis(f"{DIAGNOSIS_TOOL}: {exc}") from None
    proposed = [_recommended(a) for a in got.actions]
    kept, refusals = vet_actions(proposed, definition.actions)
    return Final(hypothesis=got.hypothesis, evidence=list(got.evidence),
                 confidence=got.confidence, actions=kept,
                 escalate=bool(got.escalate) or not kept, refusals=refusals)
