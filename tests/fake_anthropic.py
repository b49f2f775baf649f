"""The tests' fake of the Anthropic Messages API, and the models they script.

The server is actors/cli/eval/messages_api.py's (real HTTP on 127.0.0.1, enough
of POST /v1/messages for the real `anthropic` client, every request recorded),
here with the fixed key "test". A test gives it a `Model`: a function from the
request body (and the fake) to the reply. The models below are scripted
behaviours, not intelligence: `GoodSre` applies a small hand-written rule table
(the same knowledge as the webshop runbooks, written independently) to the
symptoms it reads from the prompt and the tool answers.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from actors.cli.eval.messages_api import (
    Body,
    MessagesApi,
    Model,
    broken_invariant,
    error,
    forced,
    incident_data,
    is_summary,
    messages_api,
    text,
    tool_use,
    turn,
    untrusted_blocks,
)

__all__ = ["Body", "FakeAnthropic", "GoodSre", "Model", "error", "fake_anthropic", "forced",
           "incident_data", "is_summary", "text", "tool_results", "tool_use", "turn",
           "untrusted_blocks"]

KEY = "test"


FakeAnthropic = MessagesApi  # the tests' name for it


def fake_anthropic(model: Model | None = None) -> AbstractAsyncContextManager[MessagesApi]:
    """The server on a free port with the key "test", stopped on exit."""
    return messages_api(model, KEY)


def tool_results(body: Body) -> list[dict[str, Any]]:
    last = body["messages"][-1]
    if last["role"] != "user" or isinstance(last["content"], str):
        return []
    return [c for c in last["content"] if c.get("type") == "tool_result"]


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
        decision = good_sre_decision(inc.get("invariant", broken_invariant(body)), symptoms,
                                     logs, past)
        return fake.message(body, tool_use("submit_diagnosis", decision))
