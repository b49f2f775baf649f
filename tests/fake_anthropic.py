"""A local fake of the Anthropic Messages API: real HTTP on 127.0.0.1, scripted per test.

It speaks enough of POST /v1/messages for the real `anthropic` client: message
bodies with text and tool_use content blocks, stop_reason, usage (with the
cache fields, emulating a prompt cache keyed on the cache_control prefix),
and error bodies with the real status codes and error types (429
rate_limit_error, 529 overloaded_error, 500 api_error), plus answers that
arrive too late (timeouts). Every request is recorded for assertions.

A test gives it a `Model`: a function from the request body (and the fake)
to the reply. The models below are scripted behaviours, not intelligence:
`GoodSre` applies a small hand-written rule table (the same knowledge as
the webshop runbooks, written independently) to the symptoms it reads from
the prompt and the tool answers.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Body = dict[str, Any]
Model = Callable[[Body, "FakeAnthropic"], Awaitable[web.Response] | web.Response]
UNTRUSTED = re.compile(r'<untrusted-data source="([^"]*)">\n(.*?)\n</untrusted-data>', re.S)


def _tokens(obj: Any) -> int:
    return max(1, len(json.dumps(obj)) // 4)


@dataclass
class FakeAnthropic:
    model: Model | None = None
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
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        key = request.headers.get("x-api-key") or request.headers.get(
            "authorization", "").removeprefix("Bearer ")
        if key != "test":
            return error(401, "authentication_error", "invalid API key")
        if self.model is None:
            return error(500, "api_error", "no model scripted")
        reply = self.model(body, self)
        return await reply if asyncio.iscoroutine(reply) else reply  # type: ignore[return-value]

    # --- building replies -------------------------------------------------------------

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
                                "request-id": "req_fake"})


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
async def fake_anthropic(model: Model | None = None) -> AsyncIterator[FakeAnthropic]:
    fake = FakeAnthropic(model)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


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


def tool_results(body: Body) -> list[dict[str, Any]]:
    last = body["messages"][-1]
    if last["role"] != "user" or isinstance(last["content"], str):
        return []
    return [c for c in last["content"] if c.get("type") == "tool_result"]


def turn(body: Body) -> int:
    """1 for the first call of an investigation."""
    return sum(1 for m in body["messages"] if m["role"] == "assistant") + 1


def forced(body: Body) -> bool:
    return body.get("tool_choice", {}).get("type") == "tool"


def is_summary(body: Body) -> bool:
    return not body.get("tools")


# --- scripted models --------------------------------------------------------------------


def good_sre_decision(invariant: str, symptoms: dict[str, float], logs: list[str],
                      past: list[dict[str, Any]]) -> dict[str, Any]:
    """What a competent SRE concludes from these symptoms (the webshop's failure modes)."""
    def s(name: str, default: float = 0.0) -> float:
        return float(symptoms.get(name, default))

    joined = "\n".join(logs)

    def act(*names: str, params: dict[str, dict[str, Any]] | None = None) -> list[Any]:
        return [{"action": n, "params": (params or {}).get(n, {}),
                 "rationale": "fits the symptoms"} for n in names]

    verified = [p for p in past if p.get("verified_action") and p.get("invariant") == invariant]
    if s("upstream_error_rate") > 0.5:
        return {"hypothesis": "The payments upstream is failing; nothing registered fixes it.",
                "evidence": [f"upstream_error_rate={s('upstream_error_rate')}"],
                "confidence": 0.8, "actions": [], "escalate": True}
    if s("pool_utilization") >= 0.9:
        h, a = "Connection pool exhausted by a leak.", act("recycle_pool", "scale_pool",
                                                             params={"scale_pool": {"size": 32}})
    elif "ConfigError" in joined:
        h, a = "A bad config deploy makes requests fail.", act(
            "rollback_config", "restart_worker", params={"rollback_config": {"version":
                                                                            "last_good"}})
    elif invariant == "latency_p99" and s("cache_hit_ratio", 1.0) < 0.2:
        h, a = "The product cache is off.", act("enable_cache", "restart_worker")
    elif invariant == "latency_p99" and s("db_p99_ms") > 300:
        h, a = "The database replica is slow.", act("failover_dependency", "recycle_pool")
    elif invariant == "memory":
        h, a = "The worker leaks memory.", act("restart_worker")
    elif invariant == "log_disk":
        h, a = "Something floods the logs.", act("rotate_logs", "restart_worker")
    else:
        h, a = "Unclear cause.", []
    # Memory reorders what fits the symptoms, as the runbook diagnoser's memory does; it
    # never promotes an action the symptoms argue against (recycling a pool at 10 %
    # utilisation because a past latency incident was a leak).
    # Like the runbook diagnoser's memory: only a past incident of the same cause counts
    # (a slow replica and a leaked pool both raise latency; recycling fixed the leak).
    # The fake reads "the same cause" as the cause's key word in the past hypothesis.
    cause = {"Connection pool exhausted by a leak.": "pool",
             "The database replica is slow.": "replica"}.get(h, "")
    fits = {x["action"] for x in a}
    verified = [p for p in verified if p["verified_action"] in fits
                and cause in p.get("hypothesis", "").lower()]
    if verified:
        first = {"action": verified[0]["verified_action"],
                 "params": verified[0].get("verified_params", {}),
                 "rationale": "verified for a similar past incident"}
        a = [first, *[x for x in a if x["action"] != first["action"]]]
    return {"hypothesis": h, "evidence": [f"{k}={v:g}" for k, v in sorted(symptoms.items())
                                          if k in ("pool_utilization", "cache_hit_ratio",
                                                   "db_p99_ms", "error_rate", "p99_ms")],
            "confidence": 0.8 if a else 0.2, "actions": a, "escalate": not a}


def incident_data(body: Body) -> dict[str, Any]:
    return next((d for src, d in untrusted_blocks(body) if src == "incident"), {})


@dataclass
class GoodSre:
    """Turn 1: look at observations, logs, similar incidents. Turn 2: diagnose."""

    summaries: list[str] = field(default_factory=list)

    def __call__(self, body: Body, fake: FakeAnthropic) -> web.Response:
        if is_summary(body):
            self.summaries.append(body["messages"][0]["content"])
            return fake.message(body, text("The pool leaked; the crew recycled it; resolved."))
        if turn(body) == 1 and not forced(body):
            return fake.message(body, text("Let me look."),
                                tool_use("recent_observations", {"since_s": 60,
                                                                 "max_points": 5}),
                                tool_use("recent_logs", {"limit": 50}),
                                tool_use("similar_incidents", {}))
        inc = incident_data(body)
        symptoms = dict(inc.get("symptoms", {}))
        logs = list(inc.get("recent_logs", []))
        past: list[dict[str, Any]] = []
        for source, data in untrusted_blocks(body):
            if source == "recent_observations":
                ups = [p for p in data.get("points", []) if p.get("up") and p.get("metrics")]
                if ups:  # fills gaps only: the snapshot at detection is the evidence
                    symptoms = {**ups[-1]["metrics"], **symptoms}
            elif source == "recent_logs":
                logs += data.get("lines", [])
            elif source == "similar_incidents":
                past = list(data)
        decision = good_sre_decision(inc.get("invariant", _invariant(body)), symptoms,
                                     logs, past)
        return fake.message(body, tool_use("submit_diagnosis", decision))


def _invariant(body: Body) -> str:
    first = body["messages"][0]["content"]
    found = re.search(r"Broken invariant: (\w+)", first if isinstance(first, str) else "")
    return found.group(1) if found else ""
