"""Partition leases: several processes of one actor share a partitioned stream.

MENDERS_OBS is stored by partition of the subject name (catalog.OBS_PARTITIONS,
the server's own `partition(n, 1)` subject mapping), one durable consumer per
partition. Which process consumes which partition is decided here, with keys
in the `menders_partitions` bucket:

- `<actor>.member.<instance>`: this process is alive. Re-put every renew_s.
- `<actor>.owner.<p>`: the instance that consumes partition p.

The bucket's TTL (catalog.PARTITION_LEASE_S) is the lease: the server expires
the keys of a process that stopped renewing, on its own clock (no clock is
compared between hosts), so a SIGKILLed detector's partitions are free again
within one lease. A process stopped with SIGTERM hands over at once: it stops
consuming, then deletes its keys.

The assignment is a pure function of the live members: sorted, they take the
partitions round robin (p belongs to members[p % len(members)]), so two
detectors own half each, and every process computes the same answer from the
same listing. A process claims a partition it should own with a create (which
fails while another still holds it), renews with a compare-and-swap on its
revision, and gives one up by first stopping its consumer, then deleting the key.

Correctness never rests on the lease. Two owners at once (a process paused past
its lease, which has not noticed yet) is safe, because the detector's state is a
compare-and-swap per subject (actors/detector/actor.py); the lease only keeps
that rare. A renewal that finds the key gone or taken gives the partition up at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence

from actors.runtime.kv import Bucket, KvConflict
from actors.runtime.logs import get_logger
from actors.runtime.metrics import ActorMetrics
from actors.runtime.outage import Outage
from bus_schemas import catalog

log = get_logger("menders.partitions")

Hook = Callable[[int], Awaitable[None]]

INSTANCE_ENV = "MENDERS_INSTANCE"


def instance_id() -> str:
    """This process's name among its actor's members: $MENDERS_INSTANCE, or host-pid.

    A stable name (one per systemd unit or container) lets a restarted process take
    its own partitions back at once instead of after a lease; it must be unique.
    """
    raw = os.environ.get(INSTANCE_ENV) or f"{socket.gethostname()}-{os.getpid()}"
    return re.sub(r"[^-_=a-zA-Z0-9]", "_", raw)[:64]


def member_prefix(actor: str) -> str:
    """The keys of `actor`'s live members: `<prefix><instance>`."""
    return f"{actor}.member."


def owner_key(actor: str, partition: int) -> str:
    return f"{actor}.owner.{partition}"


def in_partition(names: Iterable[str], partition: int) -> list[str]:
    """The subject names (of `names`) whose observations `partition` holds."""
    return [n for n in names if catalog.partition_of(n) == partition]


def assignment(members: Sequence[str], partitions: Sequence[int]) -> dict[int, str]:
    """Which member owns each partition: the sorted members, round robin."""
    ordered = sorted(set(members))
    if not ordered:
        return {}
    return {p: ordered[i % len(ordered)] for i, p in enumerate(sorted(partitions))}


class Leases:
    """This process's share of one actor's partitions, kept while `run` runs."""

    def __init__(self, bucket: Bucket, actor: str, partitions: Sequence[int], *,
                 acquire: Hook, release: Hook, metrics: ActorMetrics,
                 instance: str | None = None,
                 renew_s: float = catalog.PARTITION_RENEW_S) -> None:
        self.bucket = bucket
        self.actor = actor
        self.partitions = tuple(sorted(partitions))
        self.instance = instance or instance_id()
        self.renew_s = renew_s
        self._acquire = acquire
        self._release = release
        self.held: dict[int, int] = {}  # partition -> revision of our owner key
        self.members: list[str] = []
        self.outage = Outage(f"{actor} partition leases", log)
        self.owned_gauge = metrics.gauge(
            "menders_partitions_owned", "Partitions of the stream this process consumes", [])
        self.changes = metrics.counter(
            "menders_partition_changes",
            "Partitions taken (acquired), handed over (released) or found taken (lost)",
            ["change"])

    @property
    def owned(self) -> list[int]:
        return sorted(self.held)

    def _owner_key(self, p: int) -> str:
        return owner_key(self.actor, p)

    async def run(self, stopping: asyncio.Event) -> None:
        """Renew and rebalance every renew_s until `stopping`; then hand everything over."""
        try:
            while not stopping.is_set():
                with self.outage.guard():
                    await self.tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self.renew_s)
        finally:
            await self.hand_over()

    async def tick(self) -> None:
        """One round: say we are alive, list the members, keep, give up or claim."""
        prefix = member_prefix(self.actor)
        await self.bucket.put(prefix + self.instance, self.instance.encode())
        self.members = sorted({k.removeprefix(prefix) for k in await self.bucket.keys(prefix)}
                              | {self.instance})
        mine = {p for p, who in assignment(self.members, self.partitions).items()
                if who == self.instance}
        gone = [p for p in self.held if p not in mine]
        await asyncio.gather(*(self._give_up(p) for p in gone))
        for p in sorted(self.held):
            try:
                self.held[p] = await self.bucket.update_bytes(
                    self._owner_key(p), self.instance.encode(), self.held[p])
            except KvConflict:
                # Expired (we were away past the lease) or taken: stop consuming it now.
                log.warning("partition lease lost", extra={"partition": p})
                del self.held[p]
                self.changes.labels(change="lost").inc()
                await self._release(p)
        for p in sorted(mine - self.held.keys()):
            await self._claim(p)
        self.owned_gauge.labels().set(len(self.held))

    async def _claim(self, p: int) -> None:
        key, me = self._owner_key(p), self.instance.encode()
        rev = await self.bucket.create_bytes(key, me)
        if rev is None:
            got = await self.bucket.get_entry(key)
            if got is None or got[0] != me:
                return  # a predecessor holds it: it hands over, or its lease runs out
            rev = got[1]  # ours: a create that timed out but landed, or our own restart
        self.held[p] = rev
        self.changes.labels(change="acquired").inc()
        log.info("partition acquired", extra={"partition": p, "members": len(self.members)})
        await self._acquire(p)

    async def _give_up(self, p: int) -> None:
        """Stop consuming p, then free it for the member that should own it."""
        rev = self.held.pop(p)
        await self._release(p)
        self.changes.labels(change="released").inc()
        log.info("partition handed over", extra={"partition": p, "members": len(self.members)})
        with contextlib.suppress(Exception):  # not ours any more, or the broker is away:
            await self.bucket.delete(self._owner_key(p), last=rev)  # it expires by itself

    async def hand_over(self) -> None:
        """On stop: release every partition, then leave the group, so the others
        rebalance on their next round instead of waiting out the lease."""
        await asyncio.gather(*(self._give_up(p) for p in list(self.held)))
        with contextlib.suppress(Exception):
            await self.bucket.delete(member_prefix(self.actor) + self.instance)
        self.owned_gauge.labels().set(0)
