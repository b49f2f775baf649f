"""The operator's view of the bus: what `menders status|mode|kill|approve|tail` use.

The operator is a NATS user that reads everything and writes only approvals,
control commands and the kill flag (nats.conf).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from actors.planner.attempts import IncidentState, state_key
from actors.runtime import credentials
from actors.runtime.config import Config
from actors.runtime.killswitch import read_kill
from actors.runtime.kv import Bucket, Records, Unreadable
from actors.runtime.partitions import member_prefix, owner_key
from actors.runtime.publish import publish_event
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.errors import MendersError
from bus_schemas.governor import (
    KILL_KEY,
    MODE_KEY,
    PENDING_PREFIX,
    KillFlag,
    Pending,
    encode_kill,
    parse_mode,
)
from bus_schemas.natsconf import inbox_prefix, servers


class OperatorError(MendersError, RuntimeError):
    pass


@contextlib.asynccontextmanager
async def connect(config: Config, user: str = catalog.OPERATOR) -> AsyncIterator[Client]:
    url = credentials.url_from(config.home_dir, config.nats_url)
    password = credentials.password_for(user, config.home_dir)
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    try:
        nc = await nats.connect(
            servers(url), user=user, password=password, connect_timeout=2, allow_reconnect=False,
            # nats-py retries the first connect max_reconnect_attempts times (default 60,
            # 2 s apart): a CLI with no server must fail in about a second, not two minutes.
            max_reconnect_attempts=1, reconnect_time_wait=1,
            inbox_prefix=inbox_prefix(user), error_cb=on_error, name=f"menders-cli-{user}",
        )
    except Exception as exc:
        raise OperatorError(f"cannot connect to NATS at {url} as {user}: {exc!r}") from None
    try:
        yield nc
    finally:
        await nc.close()


async def publish(nc: Client, event: m.Event) -> None:
    await publish_event(nc.jetstream(timeout=5), event, catalog.OPERATOR, retry_for_s=10.0)


async def engage_kill(nc: Client, by: str, reason: str) -> None:
    """Write the kill flag directly: a kill must not depend on the governor being up."""
    gkv = await _governor_bucket(nc)
    flag = KillFlag(engaged=True, by=by, reason=reason, at=time.time())
    await gkv.put(KILL_KEY, encode_kill(flag))
    await publish(nc, m.ControlCommand(command="kill", by=by, reason=reason))


async def wait_for(nc: Client, key: str, predicate: Callable[[bytes], bool],
                   timeout: float) -> bool:
    """Poll a governor key until it exists and `predicate(its value)` holds."""
    gkv = await _governor_bucket(nc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = await gkv.get_bytes(key)
        if raw is not None and predicate(raw):
            return True
        await asyncio.sleep(0.05)
    return False


async def wait_released(nc: Client, timeout: float) -> bool:
    """Until the kill switch reads released by the one rule every reader uses (the
    governor's release at the flag's revision), not merely a flag that says so."""
    gkv = await _governor_bucket(nc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not (await read_kill(gkv)).engaged:
            return True
        await asyncio.sleep(0.05)
    return False


async def _governor_bucket(nc: Client) -> Bucket:
    return Bucket(await nc.jetstream(timeout=5).key_value(catalog.GOVERNOR_BUCKET))


@dataclass
class Status:
    actors: dict[str, dict[str, Any]] = field(default_factory=dict)
    mode: str = "unknown"
    kill: dict[str, Any] = field(default_factory=dict)
    open_incidents: list[dict[str, Any]] = field(default_factory=list)
    bad_events: list[str] = field(default_factory=list)  # undecodable incident events
    pending_approvals: list[dict[str, Any]] = field(default_factory=list)
    consumers: dict[str, dict[str, int]] = field(default_factory=dict)
    # Partitioned consumers: actor -> {"members": [instances], "owners": {p: instance}}.
    partitions: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def all_alive(self) -> bool:
        return all(a.get("alive") for a in self.actors.values())

    @property
    def healthy(self) -> bool:
        """Every actor alive and none stuck."""
        return self.all_alive and not any(a.get("stuck") for a in self.actors.values())


# An actor is "stuck" when the oldest message one of its handlers holds is older than
# this many times its consumers' longest ack_wait, and never less than STUCK_FLOOR_S: the
# runtime keeps a long handler's message alive with in_progress, so only its age shows a
# hung handler. The floor is twice the longest bounded handler of the defaults (the
# Claude diagnoser's 60 s investigation); verifier checks (30 s) and steps (<= 10 s)
# finish well within it.
STUCK_ACK_WAITS = 3
STUCK_FLOOR_S = 120.0


def stuck_after_s(actor: str) -> float:
    waits = [c.ack_wait_s for c in catalog.consumers_of(actor)]
    return max([STUCK_FLOOR_S, *(STUCK_ACK_WAITS * w for w in waits)])


async def status(nc: Client, heartbeat_s: float, stuck_after: float | None = None) -> Status:
    """Each actor's last heartbeat, the mode, the kill flag, consumers, open incidents.

    `stuck_after` (seconds) overrides every actor's stuck threshold (stuck_after_s).
    """
    js = nc.jetstream(timeout=5)
    out = Status()
    now = time.time()
    for actor in catalog.ACTORS:
        subject = catalog.subject_for(m.Heartbeat, actor=actor)
        try:
            raw = await js.get_last_msg(catalog.HEARTBEAT_STREAM, subject, direct=True)
            beat = codec.decode(raw.data or b"", (m.Heartbeat,))
            assert isinstance(beat, m.Heartbeat)
            age = now - beat.ts
            alive = age < 3 * heartbeat_s + 1
            limit = stuck_after_s(actor) if stuck_after is None else stuck_after
            out.actors[actor] = {"alive": alive, "age_s": round(age, 2),
                                 "pid": beat.pid, "handled": beat.handled,
                                 "in_flight": beat.in_flight, "metrics_port": beat.metrics_port,
                                 "oldest_in_flight_s": beat.oldest_in_flight_s,
                                 "stuck": alive and beat.oldest_in_flight_s > limit,
                                 "stuck_after_s": limit}
        except (NotFoundError, codec.DecodeError):
            out.actors[actor] = {"alive": False, "age_s": None, "stuck": False}
    gkv = Bucket(await js.key_value(catalog.GOVERNOR_BUCKET))
    out.mode = parse_mode(await gkv.get_bytes(MODE_KEY)) or "unset (governor not started)"
    out.kill = msgspec.structs.asdict(await read_kill(gkv))
    for c in catalog.CONSUMERS:
        info = await js.consumer_info(c.stream, c.durable)
        out.consumers[c.durable] = {"pending": info.num_pending or 0,
                                    "ack_pending": info.num_ack_pending or 0,
                                    "redelivered": info.num_redelivered or 0}
    out.partitions = await partition_owners(js)
    out.open_incidents, out.bad_events = await open_incidents(js)
    await with_planner_view(js, out.open_incidents)
    out.pending_approvals = await pending_approvals(gkv)
    return out


async def partition_owners(js: JetStreamContext) -> dict[str, dict[str, Any]]:
    """Who works which partition, per partitioned actor (actors.runtime.partitions):
    the live members and each partition's owner (None: free, a lease about to be taken)."""
    bucket = Bucket(await js.key_value(catalog.PARTITION_BUCKET))
    out: dict[str, dict[str, Any]] = {}
    for actor in catalog.PARTITIONED_ACTORS:
        prefix = member_prefix(actor)
        members = sorted(k.removeprefix(prefix) for k in await bucket.keys(prefix))
        owners: dict[int, str | None] = {}
        for p in range(catalog.OBS_PARTITIONS):
            raw = await bucket.get_bytes(owner_key(actor, p))
            owners[p] = raw.decode(errors="replace") if raw else None
        out[actor] = {"members": members, "owners": owners}
    return out


async def with_planner_view(js: JetStreamContext, incidents: list[dict[str, Any]]) -> None:
    """Add to each incident what the planner is doing about it now (its own record, the
    authority): working it (which attempt, which action), parked behind an obstacle
    (which, why, until when), waiting for a fresh diagnosis, or escalated."""
    records = Records(await js.key_value(catalog.PLANNER_BUCKET), IncidentState)
    for inc in incidents:
        try:
            got = await records.get(state_key(inc["incident_id"]))
        except Unreadable:
            inc["planner"] = {"unreadable": True}
            continue
        if got is None:
            inc["planner"] = {"state": "not planned yet"}
            continue
        st = got.value
        view: dict[str, Any] = {"attempt": st.attempt, "action": st.action}
        if st.closed == "escalated":
            view["state"] = "escalated"
            inc["state"] = "escalated"  # the planner's word is newer than the fold's
        elif st.parked:
            view.update(state="parked", obstacle=st.parked, reason=st.park_reason,
                        retry_at=st.retry_at)
            inc["state"] = "parked"
        elif st.request_id:
            view["state"] = "re-diagnosing"
        elif st.follows:
            view.update(state="following", leader=st.follows)
        else:
            view["state"] = "working" if st.plan_id else "waiting"
        inc["planner"] = view


async def pending_approvals(gkv: Bucket) -> list[dict[str, Any]]:
    """Steps waiting for `menders approve|deny`, soonest deadline first (settled ones,
    kept only until their events went out, are not waiting)."""
    records = Records(gkv, Pending)
    out: list[dict[str, Any]] = []
    for key in await gkv.keys(PENDING_PREFIX):
        try:
            got = await records.get(key)
        except Unreadable:
            out.append({"execution_id": key.removeprefix(PENDING_PREFIX), "unreadable": True})
            continue
        if got is not None and not got.value.settled_at:
            out.append(msgspec.structs.asdict(got.value))
    return sorted(out, key=lambda p: p.get("expires_at", 0.0))


async def open_incidents(js: JetStreamContext) -> tuple[list[dict[str, Any]], list[str]]:
    """Fold the incident lifecycle into the incidents not yet resolved, each with its
    state (`open`, or `escalated`: a human has it, and it is still broken), plus one
    line per event that does not decode (counted and named, never a crash: any
    actor's credentials can put one on an incident subject)."""
    opened: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    info = await js.stream_info(catalog.EVENTS_STREAM)
    if not info.state.messages:
        return [], []
    sub = await js.subscribe(catalog.under("incident"), ordered_consumer=True,
                             deliver_policy=nats.js.api.DeliverPolicy.ALL)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                break
            try:
                event = codec.decode(msg.data)
            except codec.DecodeError as exc:
                seq = msg.metadata.sequence.stream if msg.metadata.sequence else 0
                bad.append(f"{catalog.EVENTS_STREAM} seq {seq} on {msg.subject}: {exc}"[:300])
                event = None
            if isinstance(event, m.IncidentOpened):
                opened[event.incident_id] = {"incident_id": event.incident_id,
                                             "subject": event.subject,
                                             "invariant": event.invariant,
                                             "opened_at": event.ts, "summary": event.summary,
                                             "state": "open"}
            elif isinstance(event, m.IncidentEscalated) and event.incident_id in opened:
                opened[event.incident_id]["state"] = "escalated"
                opened[event.incident_id]["escalation"] = event.reason
            elif isinstance(event, m.RetryRequested) and event.incident_id in opened:
                opened[event.incident_id]["state"] = "open"  # a human asked to work it again
            elif isinstance(event, m.IncidentRecurring):
                for iid in event.incidents:
                    if iid in opened:
                        opened[iid]["recurring"] = event.count
            elif isinstance(event, m.IncidentResolved):
                opened.pop(event.incident_id, None)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return list(opened.values()), bad


__all__ = ["MODE_KEY", "OperatorError", "Status", "connect", "engage_kill", "publish", "status"]
