"""What an actor is: a `name` and a `handle(event, delivery)` coroutine.

The handler returns the events to publish next; the runtime (process.py)
does connecting, acking, dead-lettering, metrics and shutdown for all of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from nats.aio.msg import Msg

from bus_schemas import catalog
from bus_schemas.errors import MendersError
from bus_schemas.messages import Event

if TYPE_CHECKING:
    from actors.runtime.process import Runtime


class Reject(MendersError):
    """Raised by a handler for input that can never succeed: dead-lettered at once."""


def follow_id(cause: Event, tag: str, key: str = "") -> str:
    """A deterministic id for an event caused by `cause`.

    A redelivered cause produces the same ids again, so JetStream's
    Nats-Msg-Id dedup drops the second publish instead of doubling events.
    """
    return derive_id(cause.id, tag, key)


def derive_id(*parts: Any) -> str:
    return hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=16).hexdigest()


class Delivery:
    """What a handler may know about the message in its hands."""

    def __init__(self, msg: Msg, consumer: catalog.Consumer) -> None:
        self.msg = msg
        self.consumer = consumer
        self.num_delivered, self.stream_seq = _counts(msg)

    @property
    def redelivered(self) -> bool:
        return self.num_delivered > 1

    async def in_progress(self) -> None:
        await self.msg.in_progress()


def _counts(msg: Msg) -> tuple[int, int]:
    """(times delivered, stream sequence) from the ack subject's tokens, at the places
    nats-py's own Msg.Metadata reads them: building that whole record (timestamp,
    dataclasses) per message cost 8 % of a consumer's time (bench/runtime_vs_raw.py)."""
    tokens = (msg.reply or "").split(".")
    if tokens[:2] == [Msg.Ack.Prefix0, Msg.Ack.Prefix1]:
        if len(tokens) == _V1_TOKENS:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...
            return int(tokens[4]) or 1, int(tokens[5])
        if len(tokens) >= _V2_TOKENS - 1:
            return int(tokens[Msg.Ack.NumDelivered]) or 1, int(tokens[Msg.Ack.StreamSeq])
    md = msg.metadata  # anything else: nats-py decides (and raises on a non-JS message)
    return md.num_delivered or 1, md.sequence.stream if md.sequence else 0


_V1_TOKENS, _V2_TOKENS = 9, 12  # nats.aio.msg's token counts of the two ack formats


class Actor:
    """Base class: subclasses set `name` and implement `handle`."""

    name: ClassVar[str]

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.config = rt.config

    async def setup(self) -> None:
        """After connecting, before consuming."""

    def background(self) -> Sequence[Callable[[], Awaitable[None]]]:
        """Loops that run beside consuming (a scrape schedule, a KV watch)."""
        return ()

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        raise NotImplementedError

    async def partition_acquired(self, partition: int) -> None:
        """This process now owns `partition` of its partitioned consumers: called before
        the first message of it (actors.runtime.partitions)."""

    async def partition_released(self, partition: int) -> None:
        """This process no longer owns `partition`: its consumer has stopped and every
        message of it taken has been handled."""

    async def teardown(self) -> None:
        """After the last in-flight message finished, before the connection drains."""
