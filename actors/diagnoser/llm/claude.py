"""The Claude diagnoser: a bounded, read-only investigation, then a forced diagnosis.

Each turn the model may call the investigation tools (actors/diagnoser/investigation.py)
or submit its diagnosis. The loop is bounded three ways: `max_turns` model
calls, `max_total_tokens` over all of them and `max_wall_s` for everything;
the last turn forces the diagnosis tool (tool_choice). A tool call with bad
input, or a diagnosis that does not match its schema, goes back to the model
as an error tool_result and costs it a turn.

Whenever no valid diagnosis comes out (the API misbehaved past both retry
layers, the budget ran out, the model never submitted), the runbook
diagnoser answers instead and the diagnosis says so: source "claude->runbook"
and the reason first in its evidence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from anthropic.types import Message
from nats.aio.client import Client

from actors.diagnoser.investigation import Investigator, ToolError, tool_definitions
from actors.diagnoser.llm.client import LlmClient, LlmUnavailable
from actors.diagnoser.llm.prompt import DIAGNOSIS_TOOL, SYSTEM_PROMPT, incident_message, untrusted
from actors.diagnoser.llm.schema import Final, InvalidDiagnosis, diagnosis_tool, parse_final
from actors.diagnoser.llm.usage import LlmMetrics, Tally
from actors.diagnoser.runbook import RunbookDiagnoser, diagnosis_of, observed_evidence
from actors.runtime.config import LlmConfig
from actors.runtime.redaction import Cuts, Redactor
from bus_schemas.errors import MendersError
from bus_schemas.messages import AttemptRecord, Diagnosis, IncidentOpened
from subjects.base import SubjectDefinition

log = logging.getLogger("menders.claude")

SOURCE = "claude"
FALLBACK_SOURCE = "claude->runbook"
CACHE = {"type": "ephemeral"}
MAX_TOOL_ANSWER_CHARS = 20_000


class BudgetSpent(MendersError):
    """The investigation ended without a valid diagnosis."""


@dataclass
class Investigation:
    final: Final
    turns: int
    tally: Tally
    redactions: int = 0  # secrets cut from what the model saw


def _block_param(block: Any) -> dict[str, Any] | None:
    """A response content block as a request param (only text and tool_use go back)."""
    if block.type == "text":
        return {"type": "text", "text": block.text}
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    return None


def _result(tool_use_id: str, text: str, error: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id, "content": text}
    if error:
        out["is_error"] = True
    return out


class ClaudeDiagnoser:
    source = SOURCE

    def __init__(self, cfg: LlmConfig, client: LlmClient, metrics: LlmMetrics,
                 fallback: RunbookDiagnoser, nc: Client | None,
                 redactor: Redactor | None = None) -> None:
        self.cfg = cfg
        self.client = client
        self.metrics = metrics
        self.fallback = fallback
        self.nc = nc
        self.redactor = redactor or Redactor()

    async def diagnose(self, incident: IncidentOpened, definition: SubjectDefinition,
                       history: Sequence[AttemptRecord] = (),
                       spent_usd: float = 0.0) -> Diagnosis:
        cap = self.cfg.max_usd_per_incident
        if cap and spent_usd >= cap:
            return await self._fall_back(incident, definition, "cost_budget",
                                         f"the model's budget for this incident is spent "
                                         f"(${spent_usd:.4f} of ${cap:.2f})")
        try:
            inv = await self.investigate(incident, definition, history,
                                         cap - spent_usd if cap else 0.0)
        except LlmUnavailable as exc:
            return await self._fall_back(incident, definition, "api", f"Claude unavailable: {exc}")
        except BudgetSpent as exc:
            return await self._fall_back(incident, definition, "budget", str(exc))
        f, t = inv.final, inv.tally
        usage = (f"claude {self.cfg.model}: {inv.turns} turn(s), {t.total} tokens "
                 f"({t.cache_read} from cache), est. ${t.cost_usd:.4f}")
        evidence = [observed_evidence(incident), *f.evidence, *f.refusals, usage]
        if inv.redactions:
            evidence.append(f"{inv.redactions} secret-like string(s) redacted before the "
                            "model saw the data")
        if not f.actions and not f.escalate:
            evidence.append("no valid registered action left: a human must decide")
        d = diagnosis_of(incident, hypothesis=f.hypothesis, evidence=evidence,
                         confidence=f.confidence, actions=f.actions,
                         escalate=f.escalate or not f.actions, source=SOURCE)
        return msgspec.structs.replace(d, redactions=inv.redactions, cost_usd=t.cost_usd,
                                       tokens=t.total)

    async def _fall_back(self, incident: IncidentOpened, definition: SubjectDefinition,
                         category: str, reason: str) -> Diagnosis:
        self.metrics.fallbacks.labels(reason=category).inc()
        log.warning("claude fallback to runbooks", extra={"reason": reason[:300]})
        d = await self.fallback.diagnose(incident, definition)
        return msgspec.structs.replace(d, source=FALLBACK_SOURCE,
                                       evidence=[f"{reason}; the runbooks answered", *d.evidence])

    async def investigate(self, incident: IncidentOpened, definition: SubjectDefinition,
                          history: Sequence[AttemptRecord] = (),
                          usd_left: float = 0.0) -> Investigation:
        """`usd_left`: the incident's remaining dollar budget (0: no cap)."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.max_wall_s
        tools = [*tool_definitions(), diagnosis_tool(definition)]
        tools[-1] = {**tools[-1], "cache_control": CACHE}  # caches every tool definition
        system = [{"type": "text", "text": SYSTEM_PROMPT, "cache_control": CACHE}]
        scrub = Cuts(self.redactor)  # every string of observed data, counted
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": incident_message(incident, definition, history,
                                                         scrub)}]
        tools_by_bus = Investigator(self.nc, incident, definition, cfg.tool_timeout_s)
        tally = Tally()
        for turn in range(1, cfg.max_turns + 1):
            last = (turn == cfg.max_turns or tally.total >= 0.8 * cfg.max_total_tokens
                    or deadline - time.monotonic() < 0.25 * cfg.max_wall_s)
            choice = {"type": "tool", "name": DIAGNOSIS_TOOL} if last else {"type": "auto"}
            resp = await self.client.create(
                model=cfg.model, deadline=deadline, tally=tally, max_tokens=cfg.max_tokens,
                system=system, tools=tools, tool_choice=choice, messages=messages)
            final, answers = await self._turn(resp, tools_by_bus, definition, scrub)
            if final is not None:
                self.metrics.turns.labels().observe(turn)
                return Investigation(final, turn, tally, scrub.count)
            messages.append({"role": "assistant", "content": [
                p for b in resp.content if (p := _block_param(b)) is not None]})
            messages.append({"role": "user", "content": answers or
                             f"Call {DIAGNOSIS_TOOL} now with your diagnosis."})
            if tally.total >= cfg.max_total_tokens:
                break
            if usd_left and tally.cost_usd >= usd_left:
                raise BudgetSpent(f"the model's budget for this incident ran out during "
                                  f"the investigation (est. ${tally.cost_usd:.4f}; "
                                  f"${usd_left:.4f} were left)")
        self.metrics.turns.labels().observe(cfg.max_turns)
        raise BudgetSpent(f"Claude gave no valid diagnosis within the budget "
                          f"({tally.calls} call(s), {tally.total} tokens; limits "
                          f"{cfg.max_turns} turns, {cfg.max_total_tokens} tokens, "
                          f"{cfg.max_wall_s:g}s)")

    async def _turn(self, resp: Message, tools: Investigator, definition: SubjectDefinition,
                    scrub: Cuts) -> tuple[Final | None, list[dict[str, Any]]]:
        """A valid final diagnosis, or the tool_results to send back."""
        answers: list[dict[str, Any]] = []
        for block in resp.content:
            if block.type != "tool_use":
                continue
            if block.name == DIAGNOSIS_TOOL:
                try:
                    return parse_final(block.input, definition), []
                except InvalidDiagnosis as exc:
                    answers.append(_result(block.id, f"{exc}. Call {DIAGNOSIS_TOOL} again "
                                           "with input matching its schema.", error=True))
                continue
            try:
                data = await tools.call(block.name, block.input)
            except ToolError as exc:
                answers.append(_result(block.id, str(exc), error=True))
                continue
            text = untrusted(block.name, data, scrub)
            if len(text) > MAX_TOOL_ANSWER_CHARS:
                text = untrusted(block.name, {"error": "answer too large: narrow the query"})
            answers.append(_result(block.id, text))
        return None, answers
