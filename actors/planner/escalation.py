"""The escalation webhook: tell a human, without ever holding up the planner.

Three bodies: an escalation (`incident.escalated`), a reminder that an escalated
incident is still broken (`incident.still_escalated`, sent with a doubling
backoff until it resolves or re-enters the loop) and a recurring problem
(`incident.recurring`). Each is POSTed as JSON from a background task, with a bounded
timeout and a few retries; a failure is logged and counted, never raised.
Delivery is at least once (a redelivered escalation may be POSTed again), so
the body carries the escalation's id, also sent as `Idempotency-Key`. The
`text` field makes the body readable as-is by Slack-style incoming webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Literal

import aiohttp
from prometheus_client import Counter

from actors.runtime import derive_id
from actors.runtime.metrics import Bound
from bus_schemas.messages import IncidentEscalated, IncidentRecurring

log = logging.getLogger("menders.escalation")


def webhook_body(esc: IncidentEscalated) -> dict[str, Any]:
    where = f"{esc.subject}/{esc.invariant}" if esc.invariant else esc.subject
    return {
        "text": f"menders escalated incident {esc.incident_id} ({where}) after "
                f"{esc.attempts} attempt(s): {esc.reason}",
        "event": "incident.escalated",
        "id": esc.id,
        "incident_id": esc.incident_id,
        "subject": esc.subject,
        "invariant": esc.invariant,
        "reason": esc.reason,
        "attempts": esc.attempts,
        "ts": esc.ts,
    }


def reminder_body(incident_id: str, subject: str, n: int) -> dict[str, Any]:
    return {
        "text": f"menders reminder #{n}: incident {incident_id} ({subject}) is escalated "
                f"and still broken (`menders retry {incident_id}` puts it back in the loop)",
        "event": "incident.still_escalated",
        "id": derive_id("reminder", incident_id, n),
        "incident_id": incident_id,
        "subject": subject,
        "reminder": n,
    }


def recurring_body(rec: IncidentRecurring) -> dict[str, Any]:
    return {
        "text": f"menders: {rec.invariant} on {rec.subject} is a recurring problem: "
                f"{rec.count} incidents within {rec.window_s:g}s ({', '.join(rec.incidents)}); "
                "the crew keeps fixing each, a human should find the cause",
        "event": "incident.recurring",
        "id": rec.id,
        "incident_id": rec.incident_id,
        "subject": rec.subject,
        "invariant": rec.invariant,
        "count": rec.count,
        "incidents": rec.incidents,
        "ts": rec.ts,
    }


Format = Literal["menders", "alertmanager", "pagerduty", "slack"]


def formatted(body: dict[str, Any], fmt: Format, routing_key: str = "") -> dict[str, Any]:
    """The menders body as the receiver a user pastes the URL of expects it. Every
    shape keeps the incident's identity as its dedup key, so a repeated POST is one
    page, one alert, one thread."""
    if fmt == "menders":
        return body
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(body.get("ts", time.time())))
    summary = body["text"][:1024]
    labels = {"alertname": f"menders_{body['event'].replace('.', '_')}",
              "subject": body.get("subject", ""), "invariant": body.get("invariant", ""),
              "incident_id": body.get("incident_id", ""), "source": "menders"}
    if fmt == "alertmanager":
        alert = {"status": "firing", "labels": labels,
                 "annotations": {"summary": summary, "reason": body.get("reason", "")},
                 "startsAt": ts, "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "",
                 "fingerprint": body["incident_id"][:16]}
        return {"version": "4", "groupKey": f"{{}}:{{incident_id=\"{body['incident_id']}\"}}",
                "truncatedAlerts": 0, "status": "firing", "receiver": "menders",
                "groupLabels": {"incident_id": body["incident_id"]}, "commonLabels": labels,
                "commonAnnotations": alert["annotations"], "externalURL": "",
                "alerts": [alert]}
    if fmt == "pagerduty":
        return {"routing_key": routing_key, "event_action": "trigger",
                "dedup_key": f"menders-{body['incident_id']}",
                "payload": {"summary": summary, "source": body.get("subject") or "menders",
                            "severity": "critical" if body["event"] == "incident.escalated"
                            else "warning",
                            "timestamp": ts, "component": body.get("invariant", ""),
                            "group": body.get("subject", ""), "class": body["event"],
                            "custom_details": body}}
    return {"text": summary, "blocks": [
        {"type": "section", "text": {"type": "mrkdwn", "text": summary}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text":
            f"`{body['event']}` incident `{body.get('incident_id', '')}`"}]}]}


class EscalationWebhook:
    def __init__(self, url: str, sent: Bound[Counter], *, timeout_s: float = 5.0,
                 tries: int = 3, backoff_s: float = 0.5, fmt: Format = "menders",
                 routing_key: str = "") -> None:
        self.url = url
        self.fmt: Format = fmt
        self.routing_key = routing_key
        self.sent = sent
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.tries = tries
        self.backoff_s = backoff_s
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, esc: IncidentEscalated) -> None:
        """Schedule the POST and return at once."""
        self._post(webhook_body(esc))

    def remind(self, incident_id: str, subject: str, n: int) -> None:
        self._post(reminder_body(incident_id, subject, n))

    def notify_recurring(self, rec: IncidentRecurring) -> None:
        self._post(recurring_body(rec))

    def _post(self, body: dict[str, Any]) -> None:
        if not self.url:
            return
        task = asyncio.create_task(self._deliver(body))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.sent.labels(outcome="failed").inc()
            log.error("escalation webhook crashed", extra={"err": repr(exc)})

    async def _deliver(self, body: dict[str, Any]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        for attempt in range(1, self.tries + 1):
            try:
                async with self._session.post(
                        self.url, json=formatted(body, self.fmt, self.routing_key),
                        headers={"Idempotency-Key": body["id"]}) as resp:
                    if resp.status < 300:
                        self.sent.labels(outcome="sent").inc()
                        log.info("escalation webhook sent", extra={"status": resp.status})
                        return
                    err = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                err = repr(exc)
            log.warning("escalation webhook failed",
                        extra={"attempt": attempt, "err": err, "url": self.url})
            if attempt < self.tries:
                await asyncio.sleep(self.backoff_s * attempt)
        self.sent.labels(outcome="failed").inc()

    async def close(self, grace_s: float = 5.0) -> None:
        """Give POSTs in flight a short grace, then cancel them."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()
