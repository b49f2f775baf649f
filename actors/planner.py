"""The planner actor (placeholder until its issue lands: acks what it consumes)."""

from __future__ import annotations

from collections.abc import Sequence

from actors.runtime import Actor, Delivery
from bus_schemas.messages import Event


class Planner(Actor):
    name = "planner"

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        return ()


ACTOR = Planner
