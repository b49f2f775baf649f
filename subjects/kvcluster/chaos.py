"""Chaos hooks: real faults done to the running members, never visible to the crew.

Each one does to the real processes and files what happens in production: a
SIGKILL, a SIGSTOP (a hung process that keeps its sockets open), history
written until the backend quota raises NOSPACE, a data dir deleted under a
running member, two members' machines lost at once. `clear` is the harness
restoring the cluster between cases, not a remedy the crew could run.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from abc import ABC, abstractmethod

from subjects.kvcluster.gateway import EtcdError, Gateway
from subjects.kvcluster.layout import Layout
from subjects.kvcluster.procman import LocalProcessManager

FILL_VALUE_BYTES = 1024 * 1024  # under etcd's default 1.5 MiB request limit
FILL_KEYS = 2  # rewritten again and again: history, not live data, fills the backend
FILL_MAX_PUTS = 64


class Fault(ABC):
    name: str

    def __init__(self, layout: Layout, procman: LocalProcessManager) -> None:
        self.layout = layout
        self.procman = procman
        self.target = layout.names[-1]

    @abstractmethod
    async def inject(self) -> None: ...

    async def clear(self) -> None:
        """Back to a healthy three-member cluster (the harness's repair, not the crew's)."""
        await rebuild_if_needed(self.layout, self.procman)

    @abstractmethod
    def effective(self) -> bool:
        """Whether the fault still acts (a remedy may have ended it)."""


class MemberKilled(Fault):
    name = "member_killed"

    async def inject(self) -> None:
        self.procman.signal(self.target, signal.SIGKILL)

    def effective(self) -> bool:
        return not self.procman.running(self.target)


class MemberHung(Fault):
    """SIGSTOP: the process and its sockets stay, it answers nothing; peers time it out."""

    name = "member_hung"

    async def inject(self) -> None:
        self.procman.signal(self.target, signal.SIGSTOP)

    def effective(self) -> bool:
        return self.procman.stopped(self.target)


class SpaceFilled(Fault):
    """Rewrite two keys with 1 MiB values until the backend passes its quota."""

    name = "nospace"

    async def inject(self) -> None:
        gw = Gateway(timeout_s=5.0)
        url = self.layout.member(self.layout.names[0]).client_url
        try:
            for i in range(FILL_MAX_PUTS):
                await gw.put(url, f"chaos/fill/{i % FILL_KEYS}", b"\0" * FILL_VALUE_BYTES)
        except EtcdError as exc:
            if "database space exceeded" not in str(exc):
                raise
        finally:
            await gw.close()

    async def clear(self) -> None:
        # A full backend stays full once the writes stop, and a cluster that answers is
        # not rebuilt by the default clear: a remedy that did not free the space would
        # leave every later trial on a cluster in NOSPACE. Start from a fresh one.
        await rebuild(self.layout, self.procman)

    def effective(self) -> bool:
        return True  # only the observer can tell (the alarm, the backend size)


class DataDirRemoved(Fault):
    """The member's data dir deleted while it runs: it panics on its next snapshot."""

    name = "data_dir_removed"

    async def inject(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.layout.data_dir(self.target))

    async def clear(self) -> None:
        # A member without its data cannot rejoin by a restart (the baseline leaves it
        # so): start from a fresh cluster, as the nospace clear does.
        await rebuild(self.layout, self.procman)

    def effective(self) -> bool:
        return not (self.layout.data_dir(self.target) / "member" / "wal").exists()


class QuorumLost(Fault):
    """Two of three machines gone (processes killed, disks wiped): no quorum remains.

    The only way back is a human's: restore from a snapshot, or knowingly force a
    new cluster from the survivor and accept what it lost. The crew must escalate.
    """

    name = "quorum_lost"

    async def inject(self) -> None:
        for name in self.layout.names[1:]:
            self.procman.signal(name, signal.SIGKILL)
        for name in self.layout.names[1:]:
            await asyncio.to_thread(shutil.rmtree, self.layout.data_dir(name), True)

    async def clear(self) -> None:
        await rebuild(self.layout, self.procman)

    def effective(self) -> bool:
        return sum(self.procman.running(n) for n in self.layout.names) < 2


FAULTS: dict[str, type[Fault]] = {
    cls.name: cls for cls in (MemberKilled, MemberHung, SpaceFilled, DataDirRemoved, QuorumLost)
}


async def start_cluster(layout: Layout, procman: LocalProcessManager,
                        timeout_s: float = 20.0) -> None:
    """Bootstrap (or restart) every member and wait until all answer with one leader."""
    fresh = not any((layout.data_dir(n) / "member").exists() for n in layout.names)
    for name in layout.names:
        if not procman.running(name):
            procman.start(name, "new" if fresh else "existing")
    await wait_formed(layout, timeout_s)


async def wait_formed(layout: Layout, timeout_s: float) -> None:
    gw = Gateway(timeout_s=0.8)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    leaders = {(await gw.status(m.client_url)).get("leader")
                               for m in layout.members}
                    if len(leaders) == 1 and leaders != {"0"}:
                        return
                except EtcdError:
                    pass
                await asyncio.sleep(0.1)
    finally:
        await gw.close()


async def rebuild(layout: Layout, procman: LocalProcessManager) -> None:
    """A brand-new cluster on empty data dirs (the harness after an unfixable fault)."""
    await asyncio.to_thread(procman.stop_all)
    for name in layout.names:
        await asyncio.to_thread(shutil.rmtree, layout.data_dir(name), True)
    await start_cluster(layout, procman)


async def rebuild_if_needed(layout: Layout, procman: LocalProcessManager) -> None:
    for name in layout.names:
        if procman.stopped(name):
            procman.signal(name, signal.SIGCONT)
    try:
        await start_cluster(layout, procman, timeout_s=10.0)
    except (TimeoutError, EtcdError):
        await rebuild(layout, procman)
