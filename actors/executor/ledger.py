"""The execution ledger: what makes each execution's effect happen at most once.

One KV key per execution id in catalog.EXEC_LEDGER_BUCKET. The executor
*claims* the key with `create()` (which fails if it exists) before any
effect, and records the outcome with a compare-and-swap on the claim's
revision. JetStream delivery is at least once and a late ack can be accepted
after the message went to another worker, so the claim, not the ack, is what
stops a second effect.

States: no key (never started) -> claimed (an effect may be under way) ->
done (result recorded; a redelivery republishes it and acts on nothing).

A claim is a *lease*: while the step runs, its owner renews the entry with a
compare-and-swap every `lease_s / 3` (Temporal's heartbeat timeout). Another
executor that finds the claim waits while it keeps changing, and only takes
it as abandoned once it has seen no renewal for `lease_s` of its *own* clock,
so neither clock skew between hosts nor a reused PID (PID 1 in a container)
can make a live owner look dead or a dead one look alive. An owner whose
renewal loses the race (somebody settled its lease) stops its action.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec
from nats.js.kv import KeyValue

from actors.runtime import kv
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
    owner: str = ""  # which executor process claimed it: host/pid/random token
    claimed_at: float = 0.0
    lease_s: float = 0.0  # the owner renews within this; 0 (older entries): the reader's
    renewals: int = 0  # bumped by every renewal, so each one is a new revision
    renewed_at: float = 0.0  # the owner's clock, for humans: readers never compare it
    result: ExecutionResult | None = None


@dataclass(frozen=True)
class Record:
    entry: LedgerEntry
    revision: int


@dataclass
class LeaseWatch:
    """A reader's view of another owner's claim (pure: the caller passes its clock).

    The lease has lapsed once no new revision was seen for `lease_s` of the
    reader's own monotonic clock; every renewal is a new revision.
    """

    revision: int
    lease_s: float
    since: float  # the reader's clock when it last saw the claim change

    def lapsed(self, revision: int, lease_s: float, now: float) -> bool:
        if revision != self.revision:
            self.revision, self.lease_s, self.since = revision, lease_s, now
            return False
        return now - self.since >= self.lease_s


class LedgerConflict(kv.KvConflict):
    """Somebody else changed the entry between our read and our write."""


class Ledger:
    def __init__(self, bucket: KeyValue | kv.Bucket) -> None:
        self.records = kv.Records(bucket, LedgerEntry)

    async def read(self, execution_id: str) -> Record | None:
        got = await self.records.get(execution_id)
        return None if got is None else Record(got.value, got.revision)

    async def claim(self, entry: LedgerEntry) -> Record | None:
        """Create the entry; None if it already exists (somebody claimed it first).

        A timed-out first attempt that landed is ours: same owner and claim time.
        """
        got = await self.records.create(entry.execution_id, entry)
        return None if got is None else Record(got.value, got.revision)

    async def replace(self, record: Record, entry: LedgerEntry) -> Record:
        """Compare-and-swap on the revision we hold; LedgerConflict if it moved."""
        try:
            got = await self.records.replace(entry.execution_id, record.revision, entry)
        except kv.KvConflict:
            raise LedgerConflict(f"ledger entry {entry.execution_id} changed under us") from None
        return Record(got.value, got.revision)

    async def renew(self, record: Record, now: float) -> Record:
        """The owner's heartbeat: LedgerConflict if the entry is no longer its own."""
        e = record.entry
        return await self.replace(record, msgspec.structs.replace(
            e, renewals=e.renewals + 1, renewed_at=now))

    async def finish(self, record: Record, result: ExecutionResult) -> Record:
        done = msgspec.structs.replace(record.entry, state="done", result=result)
        return await self.replace(record, done)
