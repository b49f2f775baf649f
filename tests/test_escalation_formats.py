"""The escalation webhook in each shape a user pastes a URL of: menders' own body, an
Alertmanager v4 payload, a PagerDuty Events v2 event and a Slack message, each POSTed
to a local receiver that checks the shape that service requires."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from actors.planner.escalation import EscalationWebhook, Format
from actors.runtime.metrics import ActorMetrics
from bus_schemas import messages as m

pytestmark = pytest.mark.e2e  # a real HTTP receiver on loopback

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def menders_shape(b: dict[str, Any]) -> None:
    assert b["event"] == "incident.escalated" and b["attempts"] == 3
    assert {"id", "incident_id", "subject", "invariant", "reason", "text", "ts"} <= set(b)


def alertmanager_shape(b: dict[str, Any]) -> None:
    # What Alertmanager's webhook_config receivers are written against (version 4).
    assert b["version"] == "4" and b["status"] == "firing" and b["receiver"]
    assert isinstance(b["groupLabels"], dict) and isinstance(b["commonLabels"], dict)
    [alert] = b["alerts"]
    assert alert["status"] == "firing" and ISO.match(alert["startsAt"])
    assert alert["labels"]["alertname"] == "menders_incident_escalated"
    assert alert["labels"]["subject"] == "shop" and alert["annotations"]["summary"]
    assert alert["fingerprint"]


def pagerduty_shape(b: dict[str, Any]) -> None:
    # PagerDuty Events API v2: routing_key, event_action, payload.summary/source/severity.
    assert b["routing_key"] == "R0UT1NGKEY" and b["event_action"] == "trigger"
    assert b["dedup_key"].startswith("menders-")
    p = b["payload"]
    assert p["severity"] in ("critical", "error", "warning", "info")
    assert 0 < len(p["summary"]) <= 1024 and p["source"] == "shop"
    assert ISO.match(p["timestamp"])


def slack_shape(b: dict[str, Any]) -> None:
    assert "menders escalated incident" in b["text"]
    assert b["blocks"][0]["type"] == "section" and b["blocks"][0]["text"]["type"] == "mrkdwn"


SHAPES: dict[Format, Callable[[dict[str, Any]], None]] = {
    "menders": menders_shape, "alertmanager": alertmanager_shape,
    "pagerduty": pagerduty_shape, "slack": slack_shape}


@pytest.mark.parametrize("fmt", list(SHAPES))
async def test_each_format_is_the_shape_its_receiver_requires(fmt: Format) -> None:
    got: list[tuple[dict[str, str], dict[str, Any]]] = []
    arrived = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.json()))
        arrived.set()
        return web.json_response({"status": "success"}, status=202)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    metrics = ActorMetrics("planner")
    sent = metrics.counter("menders_escalation_webhook", "test", ["outcome"])
    hook = EscalationWebhook(url, sent, fmt=fmt, routing_key="R0UT1NGKEY")
    esc = m.IncidentEscalated(incident_id=m.new_id(), subject="shop", invariant="p99",
                              reason="3 attempt(s) failed", attempts=3)
    try:
        hook.notify(esc)
        await asyncio.wait_for(arrived.wait(), 10)
    finally:
        await hook.close()
        await runner.cleanup()
    [(headers, body)] = got
    SHAPES[fmt](body)
    assert headers["Idempotency-Key"] == esc.id
    assert esc.incident_id in str(body)  # the incident is always findable from the page
