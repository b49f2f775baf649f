"""The escalation webhook: tell a human, without ever holding up the planner.

Each escalation is POSTed as JSON from a background task, with a bounded
timeout and a few retries; a failure is logged and counted, never raised.
Delivery is at least once (a redelivered escalation may be POSTed again), so
the body carries the escalation's id, also sent as `Idempotency-Key`. The
`text` field makes the body readable as-is by Slack-style incoming webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
from prometheus_client import Counter

from actors.runtime.metrics import Bound
from bus_schemas.messages import IncidentEscalated

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


class EscalationWebhook:
    def __init__(self, url: str, sent: Bound[Counter], *, timeout_s: float = 5.0,
                 tries: int = 3, backoff_s: float = 0.5) -> None:
        self.url = url
        self.sent = sent
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.tries = tries
        self.backoff_s = backoff_s
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, esc: IncidentEscalated) -> None:
        """Schedule the POST and return at once."""
        if not self.url:
            return
        task = asyncio.create_task(self._deliver(esc))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.sent.labels(outcome="failed").inc()
            log.error("escalation webhook crashed", extra={"err": repr(exc)})

    async def _deliver(self, esc: IncidentEscalated) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        body = webhook_body(esc)
        for attempt in range(1, self.tries + 1):
            try:
                async with self._session.post(self.url, json=body,
                                              headers={"Idempotency-Key": esc.id}) as resp:
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
