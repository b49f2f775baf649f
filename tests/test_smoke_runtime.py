from __future__ import annotations

from bus_schemas import messages as m
from tests.harness import Bus


async def test_actor_process_sends_heartbeats(bus: Bus) -> None:
    bus.spawn("auditor")
    beat = await bus.wait_heartbeat("auditor")
    assert beat.actor == "auditor" and beat.pid > 0
    assert isinstance(beat, m.Heartbeat)
