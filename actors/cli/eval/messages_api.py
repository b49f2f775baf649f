"""A local stand-in for the Anthropic Messages API: real HTTP on 127.0.0.1, for plumbing.

It speaks enough of POST /v1/messages for the real `anthropic` client: message
bodies with text and tool_use content blocks, stop_reason, usage (with the cache
fields, emulating a prompt cache keyed on the cache_control prefix), and error
bodies with the real status codes and error types. Every request is recorded.

What answers is a `Model`, a function from the request body (and the server) to
the reply. The tests script theirs (tests/fake_anthropic.py); `menders eval`'s
`scripted` variant uses `RunbookModel`, which reads the incident as a model would
(the prompt's delimited data and its own tool answers) and submits what the
subject's runbook rules conclude. That exercises everything Claude's path has and
the runbook's has not (the SDK, the prompt, tool calls over the bus, the diagnosis
schema, tokens and dollars) without a model: its win rate measures the plumbing,
never Claude.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from actors.diagnoser.runbook import rank
from subjects.base import SubjectDefinition

Body = dict[str, Any]
Model = Callable[[Body, "MessagesApi"], Awaitable[web.Response] | web.Response]
UNTRUSTED = re.compile(r'<untrusted-data source="([^"]*)">\n(.*?)\n</untrusted-data>', re.S)
DIAGNOSIS_TOOL = "submit_diagnosis"


def _tokens(obj: Any) -> int:
    return max(1, len(json.dumps(obj)) // 4)  # about 4 characters per token


@dataclass
class MessagesApi:
    model: Model | None = None
    key: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    requests: list[Body] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    _cache: set[str] = field(default_factory=set)
    _runner: web.AppRunner | None = None
    _ids: int = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _messages(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "invalid_request_error", "the body is not JSON")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        key = request.headers.get("x-api-key") or request.headers.get(
            "authorization", "").removeprefix("Bearer ")
        if key != self.key:
            return error(401, "authentication_error", "invalid API key")
        if self.model is None:
            return error(500, "api_error", "no model scripted")
        reply = self.model(body, self)
        return await reply if asyncio.iscoroutine(reply) else reply  # type: ignore[return-value]

    def next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_{self._ids:06d}"

    def message(self, body: Body, *blocks: dict[str, Any],
                stop_reason: str | None = None) -> web.Response:
        """A 200 reply; usage emulates the prompt cache on the cache_control prefix."""
        prefix = [body.get("tools", []), body.get("system", [])]
        cached = _has_cache_control(prefix)
        key = json.dumps(prefix, sort_keys=True)
        prefix_tokens = _tokens(prefix)
        usage = {"input_tokens": _tokens(body.get("messages", [])),
                 "output_tokens": _tokens(blocks),
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        if cached and key in self._cache:
            usage["cache_read_input_tokens"] = prefix_tokens
        elif cached:
            self._cache.add(key)
            usage["cache_creation_input_tokens"] = prefix_tokens
        else:
            usage["input_tokens"] += prefix_tokens
        content = [dict(b) for b in blocks]
        for b in content:
            if b["type"] == "tool_use" and not b.get("id"):
                b["id"] = self.next_id("toolu")
        if stop_reason is None:
            stop_reason = "tool_use" if any(b["type"] == "tool_use" for b in content) \
                else "end_turn"
        return web.json_response({
            "id": self.next_id("msg"), "type": "message", "role": "assistant",
            "model": body.get("model", ""), "content": content,
            "stop_reason": stop_reason, "stop_sequence": None, "usage": usage})


def error(status: int, kind: str, message: str = "", retry_after_ms: int = 10) -> web.Response:
    """An API error body as the real API sends it; retry-after-ms keeps SDK retries short."""
    return web.json_response(
        {"type": "error", "error": {"type": kind, "message": message or kind}},
        status=status, headers={"retry-after-ms": str(retry_after_ms),
                                "request-id": "req_local"})


def tool_use(name: str, input: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": "", "name": name, "input": input}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def _has_cache_control(obj: Any) -> bool:
    if isinstance(obj, dict):
        return "cache_control" in obj or any(_has_cache_control(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_cache_control(v) for v in obj)
    return False


@asynccontextmanager
async def messages_api(model: Model | None = None, key: str | None = None
                       ) -> AsyncIterator[MessagesApi]:
    api = MessagesApi(model) if key is None else MessagesApi(model, key)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


# --- reading a request as a model would ------------------------------------------------


def untrusted_blocks(body: Body) -> list[tuple[str, Any]]:
    """Every delimited data block in the conversation, decoded: (source, data)."""
    found = []
    for msg in body.get("messages", []):
        content = msg["content"]
        parts = [content] if isinstance(content, str) else [
            c.get("text", "") if c.get("type") == "text" else
            c.get("content", "") if c.get("type") == "tool_result" else "" for c in content]
        for part in parts:
            if isinstance(part, str):
                for source, data in UNTRUSTED.findall(part):
                    found.append((source, json.loads(data)))
    return found


def turn(body: Body) -> int:
    """1 for the first call of an investigation."""
    return sum(1 for m in body["messages"] if m["role"] == "assistant") + 1


def forced(body: Body) -> bool:
    return body.get("tool_choice", {}).get("type") == "tool"


def is_summary(body: Body) -> bool:
    return not body.get("tools")


def incident_data(body: Body) -> dict[str, Any]:
    return next((d for src, d in untrusted_blocks(body) if src == "incident"), {})


def broken_invariant(body: Body) -> str:
    """The invariant the first (trusted) user turn names."""
    first = body["messages"][0]["content"]
    found = re.search(r"Broken invariant: (\w+)", first if isinstance(first, str) else "")
    return found.group(1) if found else ""


# --- the eval's scripted model ----------------------------------------------------------


@dataclass
class RunbookModel:
    """Turn 1: read the recent logs (a tool call over the bus). Turn 2: submit what the
    subject's runbook rules conclude from the symptoms and every log line seen."""

    definition: SubjectDefinition

    def __call__(self, body: Body, api: MessagesApi) -> web.Response:
        if is_summary(body):
            return api.message(body, text("The crew's scripted stand-in closed this incident."))
        if turn(body) == 1 and not forced(body):
            return api.message(body, text("Reading the logs first."),
                               tool_use("recent_logs", {"limit": 50}))
        return api.message(body, tool_use(DIAGNOSIS_TOOL, self.decide(body)))

    def decide(self, body: Body) -> dict[str, Any]:
        inc = incident_data(body)
        symptoms = {k: float(v) for k, v in dict(inc.get("symptoms", {})).items()}
        logs = [str(x) for x in inc.get("recent_logs", [])]
        for source, data in untrusted_blocks(body):
            if source == "recent_logs" and isinstance(data, dict):
                logs += [str(x) for x in data.get("lines", [])]
        matches = rank(self.definition.runbooks, broken_invariant(body), symptoms, logs)
        if not matches:
            return {"hypothesis": "No rule I know fits these symptoms.",
                    "evidence": [f"{k}={v:g}" for k, v in sorted(symptoms.items())][:20],
                    "confidence": 0.1, "actions": [], "escalate": True}
        best = matches[0]
        actions = [] if best.rule.escalate else [
            _proposed(a) for m in matches if not m.rule.escalate for a in m.rule.actions]
        return {"hypothesis": best.rule.hypothesis, "evidence": list(best.evidence)[:20],
                "confidence": min(max(best.rule.confidence, 0.0), 1.0),
                "actions": actions[:5], "escalate": not actions}


def _proposed(rec: Any) -> dict[str, Any]:
    """A runbook's RecommendedAction as the diagnosis tool's ProposedAction."""
    if not rec.steps:
        return {"action": rec.action, "params": dict(rec.params), "rationale": rec.rationale}
    return {"action": rec.steps[0].action, "remedy": rec.action[:60],
            "rationale": rec.rationale, "steps": msgspec.to_builtins(rec.steps)}
