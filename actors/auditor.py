"""The auditor actor (placeholder until its issue lands: acks what it consumes)."""

from __future__ import annotations

from collections.abc import Sequence

from actors.runtime import Actor, Delivery
from bus_schemas.messages import Event


class Auditor(Actor):
    name = "auditor"

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        return ()


ACTOR = Auditor
