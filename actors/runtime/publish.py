"""The one way an event reaches the bus: stamped, encoded, on its catalog subject, deduplicated.

Actors publish through Runtime.publish, the operator CLI and the benches
through `publish_event` directly; both land here, so every event carries its
producer, goes to `catalog.bus_subject_of(event)` and sets `Nats-Msg-Id`.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from actors.runtime.logs import get_logger
from bus_schemas import catalog, codec
from bus_schemas.messages import Event

log = get_logger("menders.publish")


def stamped(event: Event, producer: str) -> Event:
    """The event with its producer filled in (a producer already set is kept)."""
    return event if event.producer else msgspec.structs.replace(event, producer=producer)


async def publish_event(js: JetStreamContext, event: Event, producer: str,
                        *, retry_for_s: float = 30.0) -> Event:
    """Publish to JetStream and wait for the stream's ack; returns the event as sent.

    A publish that timed out has an unknown outcome, so it is retried with the
    same Nats-Msg-Id: the stream drops the copy if the first one landed.
    """
    event = stamped(event, producer)
    subject = catalog.bus_subject_of(event)
    payload = codec.encode(event)
    headers = {"Nats-Msg-Id": event.id}
    delay = 0.05
    deadline = time.monotonic() + retry_for_s
    retries = 0
    while True:
        try:
            await js.publish(subject, payload, headers=headers)
            if retries:
                log.info("publish went through", extra={"subject": subject,
                                                        "retries": retries})
            return event
        except (nats.errors.TimeoutError, nats.js.errors.NoStreamResponseError) as exc:
            if time.monotonic() > deadline:
                raise
            # Once per publish, not per attempt: an outage is one line, not a flood.
            (log.debug if retries else log.warning)(
                "publish retry", extra={"subject": subject, "err": repr(exc)})
            retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
