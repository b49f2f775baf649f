"""The action client: remedies through etcd's admin API and the process manager.

Each action is safe on its own: it re-reads live state first and refuses
(ActionError, naming why) what would risk quorum or is ambiguous. A remedy that
ran and did not work raises RemedyFailed with etcd's own words.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from bus_schemas.errors import MendersError
from subjects.base import ActionError
from subjects.kvcluster.actions import ACTIONS, DisarmParams, MemberParams, MoveLeaderParams
from subjects.kvcluster.gateway import EtcdError, Gateway, as_int
from subjects.kvcluster.layout import Layout
from subjects.kvcluster.procman import LocalProcessManager

PROBE_TIMEOUT_S = 0.8


class RemedyFailed(MendersError, RuntimeError):
    """The remedy ran and the cluster did not come back as it should."""


class KvClusterActionClient:
    def __init__(self, layout: Layout, procman: LocalProcessManager | None = None) -> None:
        self.layout = layout
        self.procman = procman or LocalProcessManager(layout)
        self.gw = Gateway(PROBE_TIMEOUT_S)
        self._remedies: dict[str, Callable[[Any], Awaitable[str]]] = {
            "restart_member": self.restart_member, "compact": self.compact,
            "defragment": self.defragment, "disarm_alarm": self.disarm_alarm,
            "move_leader": self.move_leader, "replace_member": self.replace_member,
        }

    async def run(self, action: str, params: dict[str, Any], timeout_s: float) -> str:
        spec = ACTIONS.get(action)
        if spec is None:
            raise ActionError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}",
                              code="invalid")
        typed = spec.validate(params)
        try:
            async with asyncio.timeout(timeout_s):
                return await self._remedies[action](typed)
        except EtcdError as exc:
            raise RemedyFailed(f"{action}: {exc}") from None

    async def precondition(self, action: str, params: dict[str, Any]) -> str | None:
        """Blast radius on fresh state, before a disruptive step starts: a member is taken
        out (or brought back) only while every other member answers."""
        spec = ACTIONS.get(action)
        if spec is None or not spec.disruptive:
            return None
        member = str(params.get("member", ""))
        down = [n for n, s in (await self._statuses()).items() if s is None]
        if not member and action in ("restart_member", "replace_member") and len(down) == 1:
            member = down[0]  # "the one member that does not answer": bringing it back
        down = [n for n in down if n != member]
        if down:
            return (f"{action}: {', '.join(down)} down; taking {member or 'a member'} out "
                    "too would risk quorum")
        return None

    # --- live state ------------------------------------------------------------

    async def _status(self, name: str) -> dict[str, Any] | None:
        try:
            return await self.gw.status(self.layout.member(name).client_url)
        except EtcdError:
            return None

    async def _statuses(self) -> dict[str, dict[str, Any] | None]:
        got = await asyncio.gather(*(self._status(n) for n in self.layout.names))
        return dict(zip(self.layout.names, got, strict=True))

    def _named(self, member: str) -> str:
        if member and member not in self.layout.names:
            raise ActionError(f"no member {member!r}; members: {', '.join(self.layout.names)}",
                              code="invalid")
        return member

    async def _the_down_one(self, member: str, action: str) -> str:
        if self._named(member):
            return member
        down = [n for n, s in (await self._statuses()).items() if s is None]
        if len(down) != 1:
            raise ActionError(f"{action}: refused: name the member; {len(down)} members do "
                              f"not answer ({', '.join(down) or 'none'})", code="refused")
        return down[0]

    async def _healthy_url(self, exclude: str = "") -> str:
        for name, status in (await self._statuses()).items():
            if name != exclude and status is not None and status.get("leader", "0") != "0":
                return self.layout.member(name).client_url
        raise RemedyFailed("no member answers with a leader (quorum lost?)")

    async def _all_others_up(self, member: str, action: str) -> None:
        """Blast radius: a member is taken out only while every other one answers."""
        down = [n for n, s in (await self._statuses()).items() if n != member and s is None]
        if down:
            raise ActionError(f"{action}: refused: {', '.join(down)} down; taking {member} "
                              "out too would risk quorum", code="refused")

    async def _wait_healthy(self, name: str, deadline: float) -> None:
        url = self.layout.member(name).client_url
        while True:
            try:
                code, body = await self.gw.get_text(url, "/health")
                if code == 200 and '"true"' in body:
                    return
            except EtcdError:
                pass
            if not self.procman.running(name):
                raise RemedyFailed(f"{name} exited: {self._last_words(name)}")
            if time.monotonic() > deadline:
                raise RemedyFailed(f"{name} not healthy in time: {self._last_words(name)}")
            await asyncio.sleep(0.1)

    def _last_words(self, name: str) -> str:
        try:
            text = self.layout.log_file(name).read_text(errors="replace")[-20000:]
        except OSError:
            return "no log"
        for line in reversed(text.splitlines()):
            if '"level":"fatal"' in line or '"level":"panic"' in line or \
                    line.startswith("panic:") or '"level":"error"' in line:
                return line[:400]
        return "no error logged"

    # --- remedies ----------------------------------------------------------------

    async def restart_member(self, p: MemberParams) -> str:
        name = await self._the_down_one(p.member, "restart_member")
        if not any((self.layout.data_dir(name) / "member" / "wal").glob("*.wal")):
            # Rejoining empty, it could vote a stale member in and lose committed writes.
            raise ActionError(f"restart_member: refused: {name} has no data (no WAL under "
                              f"its data dir); a lost member is replaced, not restarted",
                              code="refused")
        if await self._status(name) is not None:
            await self._all_others_up(name, "restart_member")
        await asyncio.to_thread(self.procman.stop, name)
        pid = self.procman.start(name, "existing")
        await self._wait_healthy(name, time.monotonic() + 15.0)
        return f"{name} restarted (pid {pid}) and healthy"

    async def compact(self, _: msgspec.Struct) -> str:
        url = await self._healthy_url()
        revision = as_int((await self.gw.status(url))["header"]["revision"])
        try:
            await self.gw.compact(url, revision, timeout_s=10.0)
        except EtcdError as exc:
            if "compacted" not in str(exc):
                raise
            return f"already compacted at revision {revision}"
        return f"compacted to revision {revision}"

    async def defragment(self, p: MemberParams) -> str:
        statuses = await self._statuses()
        name = self._named(p.member) or max(
            (n for n, s in statuses.items() if s is not None),
            key=lambda n: as_int((statuses[n] or {}).get("dbSize")), default="")
        if not name or statuses.get(name) is None:
            raise ActionError(f"defragment: refused: {name or 'no member'} does not answer",
                              code="refused")
        await self._all_others_up(name, "defragment")
        before = as_int((statuses[name] or {}).get("dbSize"))
        await self.gw.defragment(self.layout.member(name).client_url, timeout_s=25.0)
        after = as_int((await self.gw.status(self.layout.member(name).client_url))["dbSize"])
        return f"{name} defragmented: {before} -> {after} bytes"

    async def disarm_alarm(self, p: DisarmParams) -> str:
        url = await self._healthy_url()
        raised = [a for a in await self.gw.alarms(url) if a.get("alarm") == p.alarm]
        for alarm in raised:
            await self.gw.disarm(url, str(alarm["memberID"]), p.alarm)
        return f"{p.alarm} disarmed on {len(raised)} member(s)"

    async def move_leader(self, p: MoveLeaderParams) -> str:
        statuses = await self._statuses()
        live = {n: s for n, s in statuses.items() if s is not None}
        leader_id = next((s["leader"] for s in live.values() if s.get("leader", "0") != "0"), "")
        leader = next((n for n, s in live.items() if s["header"]["member_id"] == leader_id), "")
        if not leader:
            raise RemedyFailed("no answering leader to hand leadership over")
        followers = {n: s for n, s in live.items() if n != leader}
        target = self._named(p.target) or max(
            followers, key=lambda n: as_int(followers[n].get("raftAppliedIndex")), default="")
        if target not in followers:
            raise ActionError(f"move_leader: refused: {target or 'no follower'} is not an "
                              f"answering follower (leader: {leader})", code="refused")
        await self.gw.transfer_leadership(self.layout.member(leader).client_url,
                                          str(followers[target]["header"]["member_id"]))
        return f"leadership moved {leader} -> {target}"

    async def replace_member(self, p: MemberParams) -> str:
        name = await self._the_down_one(p.member, "replace_member")
        if await self._status(name) is not None:
            raise ActionError(f"replace_member: refused: {name} answers; replace only a "
                              "member that lost its data (restart it otherwise)", code="refused")
        url = await self._healthy_url(exclude=name)
        peer = self.layout.member(name).peer_url
        await asyncio.to_thread(self.procman.stop, name)
        await self._membership(url, peer, present=False)
        await asyncio.to_thread(shutil.rmtree, self.layout.data_dir(name), True)
        await self._membership(url, peer, present=True)
        initial = ",".join(f"{m.get('name') or name}={m['peerURLs'][0]}"
                           for m in await self.gw.members(url))
        pid = self.procman.start(name, "existing", initial)
        await self._wait_healthy(name, time.monotonic() + 20.0)
        return f"{name} removed, re-added as a new member and started (pid {pid}); healthy"

    async def _membership(self, url: str, peer: str, *, present: bool,
                          budget_s: float = 15.0) -> None:
        """Make the member with this peer URL present (added) or absent (removed), from a
        fresh member list each try, so a change that landed unanswered is not made twice.
        etcd refuses a change until every member has been connected for 5 s ("unhealthy
        cluster", right after a restart) and may leave one proposed during an election
        unanswered: both pass, so try again within the action's own timeout."""
        deadline = time.monotonic() + budget_s
        while True:
            try:
                listed = [m for m in await self.gw.members(url)
                          if peer in (m.get("peerURLs") or [])]
                if present and not listed:
                    await self.gw.member_add(url, peer)
                for m in listed if not present else []:
                    await self.gw.member_remove(url, str(m["ID"]))
                return
            except EtcdError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        await self.gw.close()
