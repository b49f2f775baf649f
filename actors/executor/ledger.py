"""The execution ledger: what makes each execution's effect happen at most once.

One KV key per execution id in catalog.EXEC_LEDGER_BUCKET. The executor
*claims* the key with `create()` (which fails if it exists) before any
effect, and records the outcome with a compare-and-swap on the claim's
revision. JetStream delivery is at least once and a late ack can be accepted
after the message went to another worker, so the claim, not the ack, is what
stops a second effect.

States: no key (never started) -> claimed (an effect may be under way) ->
done (result recorded; a redelivery republishes it and acts on nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from bus_schemas.messages import ExecutionResult

State = Literal["claimed", "done"]


class LedgerEntry(msgspec.Struct, kw_only=True):
    execution_id: str
    plan_id: str
    subject: str
    action: str
    idempotent: bool
    state: State = "claimed"
    attempts: int = 1  # >1 only for an idempotent step re-run after a crash
    owner: str = ""  # which executor process claimed it (pid@host/start)
    claimed_at: float = 0.0
    result: ExecutionResult | None = None


@dataclass(frozen=True)
class Record:
    entry: LedgerEntry
    revision: int


class LedgerConflict(RuntimeError):
    """Somebody else changed the entry between our read and our write."""


_decoder = msgspec.json.Decoder(LedgerEntry)


class Ledger:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def read(self, execution_id: str) -> Record | None:
        try:
            got = await self.kv.get(execution_id)
        except KeyNotFoundError:
            return None
        return Record(_decoder.decode(got.value or b""), got.revision or 0)

    async def claim(self, entry: LedgerEntry) -> Record | None:
        """Create the entry; None if it already exists (somebody claimed it first)."""
        try:
            rev = await _retrying(lambda: self.kv.create(entry.execution_id,
                                                         msgspec.json.encode(entry)))
        except KeyWrongLastSequenceError:
            # Ours if a timed-out first attempt landed (same owner and claim time).
            now = await self.read(entry.execution_id)
            return now if now is not None and now.entry == entry else None
        return Record(entry, rev)

    async def replace(self, record: Record, entry: LedgerEntry) -> Record:
        """Compare-and-swap on the revision we hold; LedgerConflict if it moved."""
        try:
            rev = await _retrying(lambda: self.kv.update(
                entry.execution_id, msgspec.json.encode(entry), last=record.revision))
        except KeyWrongLastSequenceError:
            # A timed-out first attempt may have landed: then the entry is ours already.
            now = await self.read(entry.execution_id)
            if now is not None and now.entry == entry:
                return now
            raise LedgerConflict(f"ledger entry {entry.execution_id} changed under us") from None
        return Record(entry, rev)

    async def finish(self, record: Record, result: ExecutionResult) -> Record:
        done = msgspec.structs.replace(record.entry, state="done", result=result)
        return await self.replace(record, done)


async def _retrying(op: Callable[[], Awaitable[int]], attempts: int = 5) -> int:
    """Retry a KV write whose outcome is unknown (timeout): the CAS makes it safe."""
    delay = 0.1
    for attempt in range(attempts):
        try:
            return int(await op())
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
