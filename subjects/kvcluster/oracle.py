"""The etcd cluster's independent oracle: its real health from the members and etcd itself.

Served as `GET /oracle` on the launcher's chaos port (subjects/chaoshttp.py). It
reads no chaos flag and no member's Prometheus text (what the crew's observer
reads): each member's process state (/proc, by its recorded PID), its
maintenance status and /health, the cluster's alarm list and member list (etcd's
own API), and each member's data dir on disk.

Effects. The crew's actions on this subject do not pass through the launcher:
the executor's action client calls etcd's API and starts member processes
itself (subjects/kvcluster/client.py). So the effects are counted where they
land, by `EffectTracker`: member processes started by anyone but this launcher
(its own starts, the harness's repairs, are known by PID) are `restart_member`,
or `replace_member` when etcd removed that member from the cluster first; and
what each member logs when it carries out a request: `finished defragment`,
`leadership transfer finished` (not while it shuts down, when it hands its
leadership over by itself), `finished scheduled compaction`, `alarm disarmed`.
The last two are raft-applied, logged by every member: counted as the most any
one member logged, leaving out what a member replays while it catches up
(between its start and `published local member to cluster through raft`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subjects.chaoshttp import Check, Periodic
from subjects.kvcluster.actions import ACTIONS
from subjects.kvcluster.gateway import EtcdError, Gateway, as_int
from subjects.kvcluster.layout import Layout
from subjects.kvcluster.procman import LocalProcessManager

CALL_TIMEOUT_S = 0.7  # a loaded member may take a while; a hung (SIGSTOPped) one never answers
SPACE_LIMIT = 0.9  # of the backend quota: past it, the next large put raises NOSPACE
TRACK_EVERY_S = 0.05  # a restart takes ~0.2 s at best: two in one tick are impossible
MAX_READ = 256 * 1024  # log bytes read per member per tick (the rest: on the next tick)
MIB = 1024 * 1024

# What a member logs (etcd 3.4, zap JSON) -> the effect it stands for.
STARTED = "starting an etcd server"
PUBLISHED = "published local member to cluster through raft"
SHUTTING_DOWN = "received signal; shutting down"
DEFRAGMENTED = "finished defragment"
LEADER_MOVED = "leadership transfer finished"
COMPACTED = "finished scheduled compaction"
DISARMED = "alarm disarmed"
REMOVED = "removed member"
_NOTED = tuple(m.encode() for m in (STARTED, PUBLISHED, SHUTTING_DOWN, DEFRAGMENTED,
                                    LEADER_MOVED, COMPACTED, DISARMED, REMOVED))


class OwnedProcessManager(LocalProcessManager):
    """The launcher's process manager, remembering the PIDs it started itself."""

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        self.own: set[int] = set()

    def start(self, name: str, state: str = "existing", initial: str | None = None) -> int:
        pid = super().start(name, state, initial)
        self.own.add(pid)
        return pid


@dataclass
class MemberLog:
    """One member's log, read as it grows, and where its process is in its life."""

    path: Path
    offset: int = 0
    partial: bytes = b""
    catching_up: bool = False  # started, not yet published: replaying what it missed
    shutting_down: bool = False
    applied: Counter[str] = field(default_factory=Counter)  # raft-applied effects it logged

    def new_lines(self) -> list[bytes]:
        try:
            with self.path.open("rb") as f:
                f.seek(0, 2)
                if f.tell() < self.offset:  # truncated or replaced: from its start
                    self.offset, self.partial = 0, b""
                f.seek(self.offset)
                chunk = f.read(MAX_READ)
        except OSError:
            return []
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        return lines


class EffectTracker:
    """Counts the crew's effects on the cluster as they land (see the module docstring)."""

    def __init__(self, layout: Layout, procman: OwnedProcessManager) -> None:
        self.layout = layout
        self.procman = procman
        self.counts: Counter[str] = Counter(dict.fromkeys(ACTIONS, 0))
        self.logs = {n: MemberLog(layout.log_file(n)) for n in layout.names}
        for log in self.logs.values():  # since the launcher started: not older runs
            with contextlib.suppress(OSError):
                log.offset = log.path.stat().st_size
        self.pids = {n: self._pid(n) for n in layout.names}
        self.removed: set[str] = set()  # members etcd removed since their last start
        self.by_peer = {m.peer_url: m.name for m in layout.members}
        self.ticker = Periodic(self.poll, TRACK_EVERY_S)

    def _pid(self, name: str) -> int | None:
        try:
            return int(self.layout.pid_file(name).read_text())
        except (OSError, ValueError):
            return None

    def _note(self, name: str, log: MemberLog, record: dict[str, Any]) -> None:
        msg = record.get("msg")
        if msg == STARTED:
            log.catching_up, log.shutting_down = True, False
        elif msg == PUBLISHED:
            log.catching_up = False
        elif msg == SHUTTING_DOWN:
            log.shutting_down = True
        elif msg == DEFRAGMENTED:
            self.counts["defragment"] += 1
        elif msg == LEADER_MOVED and not log.shutting_down:
            self.counts["move_leader"] += 1
        elif log.catching_up:
            return  # a raft entry replayed, already counted where it first applied
        elif msg == COMPACTED:
            log.applied["compact"] += 1
        elif msg == DISARMED:
            log.applied["disarm_alarm"] += 1
        elif msg == REMOVED:
            for url in record.get("removed-remote-peer-urls") or []:
                if url in self.by_peer:
                    self.removed.add(self.by_peer[url])

    def poll(self) -> None:
        # Logs first: etcd logs a removal before replace_member starts the new process.
        for name, log in self.logs.items():
            for line in log.new_lines():
                if not any(n in line for n in _NOTED):  # most lines: no JSON parse
                    continue
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        self._note(name, log, record)
        for name in self.layout.names:
            pid = self._pid(name)
            if pid is None or pid == self.pids[name]:
                continue
            self.pids[name] = pid
            if pid not in self.procman.own:
                self.counts["replace_member" if name in self.removed else "restart_member"] += 1
            self.removed.discard(name)

    def effects(self) -> dict[str, int]:
        self.poll()
        counts = dict(self.counts)
        for action in ("compact", "disarm_alarm"):
            counts[action] = max(log.applied[action] for log in self.logs.values())
        return counts

    def start(self) -> None:
        self.ticker.start()

    async def stop(self) -> None:
        await self.ticker.stop()


class KvClusterOracle:
    def __init__(self, layout: Layout, procman: OwnedProcessManager) -> None:
        self.layout = layout
        self.procman = procman
        self.tracker = EffectTracker(layout, procman)
        self.gw = Gateway(CALL_TIMEOUT_S)

    def checks(self) -> Mapping[str, Check]:
        return {"members": self.members, "cluster": self.cluster, "data": self.data}

    def effects(self) -> dict[str, int]:
        return self.tracker.effects()

    def start(self) -> None:
        self.tracker.start()

    async def close(self) -> None:
        await self.tracker.stop()
        await self.gw.close()

    async def _ask(self, name: str) -> tuple[dict[str, Any] | None, str]:
        """A member's status and whether its /health says true; (None, why) otherwise."""
        url = self.layout.member(name).client_url
        try:
            status, (code, body) = await asyncio.gather(self.gw.status(url),
                                                        self.gw.get_text(url, "/health"))
        except EtcdError as exc:
            return None, str(exc)[:200]
        healthy = code == 200 and '"health":"true"' in body.replace(" ", "")
        return status, "" if healthy else f"/health says {body.strip()[:120]}"

    async def members(self) -> list[str]:
        """Every member's process running (not stopped), answering, healthy, within its
        quota; one leader that every answering member agrees on, itself answering."""
        names = self.layout.names
        answers = dict(zip(names, await asyncio.gather(*(self._ask(n) for n in names)),
                           strict=True))
        failing = []
        statuses: dict[str, dict[str, Any]] = {}
        for name in names:
            if not self.procman.running(name):
                failing.append(f"{name}: etcd process not running")
                continue
            if self.procman.stopped(name):
                failing.append(f"{name}: etcd process stopped (SIGSTOP): hung")
                continue
            status, why = answers[name]
            if status is None:
                failing.append(f"{name}: does not answer: {why}")
                continue
            statuses[name] = status
            if why:
                failing.append(f"{name}: unhealthy: {why}")
            size, quota = as_int(status.get("dbSize")), self.layout.quota_bytes
            if size >= SPACE_LIMIT * quota:
                failing.append(f"{name}: backend {size / MIB:.1f} MiB of its "
                               f"{quota / MIB:.0f} MiB quota")
        ids = {str(s.get("header", {}).get("member_id", "")): n for n, s in statuses.items()}
        leaders = {str(s.get("leader", "0")) for s in statuses.values()}
        if len(statuses) <= len(names) // 2:
            failing.append(f"cluster: {len(statuses)}/{len(names)} members answer: "
                           "no quorum")
        elif len(leaders) != 1 or leaders == {"0"}:
            failing.append(f"cluster: the answering members see leaders {sorted(leaders)}")
        elif next(iter(leaders)) not in ids:
            failing.append(f"cluster: leader {next(iter(leaders))} is not an answering member")
        return failing

    async def _first(self, call: str) -> list[dict[str, Any]] | None:
        """The first answer to an alarm or member list from any member (asked at once)."""
        fn = self.gw.alarms if call == "alarms" else self.gw.members
        tasks = [asyncio.ensure_future(fn(m.client_url)) for m in self.layout.members]
        try:
            for done in asyncio.as_completed(tasks):
                with contextlib.suppress(EtcdError):
                    return await done
            return None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def cluster(self) -> list[str]:
        """No alarm raised; the member list holds exactly the layout's members, started."""
        alarms, members = await asyncio.gather(self._first("alarms"), self._first("members"))
        failing = []
        ids: dict[str, str] = {}
        if members is None:
            failing.append("cluster: no member answers its member list")
        else:
            listed = Counter(url for m in members for url in m.get("peerURLs") or [])
            for m in members:
                ids[str(m.get("ID", ""))] = m.get("name") or "?"
                urls = m.get("peerURLs") or []
                if not any(u in {x.peer_url for x in self.layout.members} for u in urls):
                    failing.append(f"cluster: member list holds an unknown member {urls}")
            for member in self.layout.members:
                entry = [m for m in members if member.peer_url in (m.get("peerURLs") or [])]
                if listed[member.peer_url] == 0:
                    failing.append(f"{member.name}: not in the member list")
                elif listed[member.peer_url] > 1:
                    failing.append(f"{member.name}: in the member list twice")
                elif not entry[0].get("name"):
                    failing.append(f"{member.name}: in the member list but never started "
                                   "(added, not joined)")
        if alarms is None:
            failing.append("cluster: no member answers its alarm list")
        else:
            raised: dict[str, list[str]] = {}
            for a in alarms:
                who = ids.get(str(a.get("memberID", "")), str(a.get("memberID", "")))
                raised.setdefault(str(a.get("alarm", "?")), []).append(who)
            failing += [f"cluster: {alarm} alarm raised (by {', '.join(sorted(who))})"
                        for alarm, who in sorted(raised.items())]
        return failing

    async def data(self) -> list[str]:
        """Every member's data dir holds its WAL and snapshot dirs."""
        return await asyncio.to_thread(self._data)

    def _data(self) -> list[str]:
        failing = []
        for name in self.layout.names:
            member = self.layout.data_dir(name) / "member"
            if not any((member / "wal").glob("*.wal")):
                failing.append(f"{name}: data dir lost its WAL ({member / 'wal'} has no .wal)")
            elif not (member / "snap").is_dir():
                failing.append(f"{name}: data dir has no snap dir ({member / 'snap'})")
        return failing
