"""A real actor process on the real Runtime, whose handler the test chooses.

Run as `python tests/fixture_actor.py` with the environment of an actor
(tests/harness.py Bus.env_for). It takes a catalog actor's name, so it binds
that actor's durables with that actor's credentials only.

FIXTURE_ACTOR   catalog actor name (default diagnoser)
FIXTURE_MODE    ok | fail:N (fail the first N deliveries) | always_fail | sleep:S
FIXTURE_MODE    ... | reject (every message is rejected: dead-lettered)
FIXTURE_RECORD  file to append "start|done <event id> <delivery>" lines to
FIXTURE_BREAK   dead_letter: the runtime's dead-letter publish fails (an error outside
                the handler, in the runtime's own per-message work)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from actors.runtime import Actor, Delivery, Reject, Runtime, config, logs
from bus_schemas.messages import DeadLetter, Event

NAME = os.environ.get("FIXTURE_ACTOR", "diagnoser")
MODE, _, ARG = os.environ.get("FIXTURE_MODE", "ok").partition(":")
RECORD = os.environ.get("FIXTURE_RECORD", "")
BREAK = os.environ.get("FIXTURE_BREAK", "")


def record(what: str, event: Event, delivery: Delivery) -> None:
    if not RECORD:
        return
    # O_APPEND + one write per line: lines from concurrent handlers never interleave,
    # and a line is on disk before a SIGKILL can land.
    fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {event.id} {delivery.num_delivered}\n".encode())
    finally:
        os.close(fd)


class FixtureActor(Actor):
    name = NAME

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        record("start", event, delivery)
        if MODE == "fail" and delivery.num_delivered <= int(ARG):
            raise RuntimeError(f"planned failure on delivery {delivery.num_delivered}")
        if MODE == "reject":
            raise Reject("this handler rejects everything")
        if MODE == "always_fail":
            raise RuntimeError("this handler always fails")
        if MODE == "sleep":
            await asyncio.sleep(float(ARG))
        record("done", event, delivery)
        return ()


class BrokenDeadLetters(Runtime):
    async def publish(self, event: Event) -> None:
        if isinstance(event, DeadLetter):
            raise RuntimeError(f"injected: dead-letter publish fails (seq {event.stream_seq})")
        await super().publish(event)


def main() -> None:
    cfg = config.load()
    logs.setup(NAME, cfg.runtime.log_level)
    runtime = BrokenDeadLetters if BREAK == "dead_letter" else Runtime
    asyncio.run(runtime(NAME, cfg).run(FixtureActor))


if __name__ == "__main__":
    main()
