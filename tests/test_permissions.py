"""nats.conf against the real server: each user may do exactly what the catalog says.

A refused publish shows in two places, and every test looks at both: the
client's error_cb receives the permissions violation, and nothing lands (no
PubAck, no message in the stream, no change in the consumer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import KeyNotFoundError, NotFoundError

from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.governor import KILL_KEY, MODE_KEY, KillFlag, revoked_key
from bus_schemas.natsconf import inbox_prefix
from tests.harness import Bus

USERS = (*catalog.ACTORS, catalog.OPERATOR)
EVENTS = catalog.EVENTS_STREAM
APPROVED_ANY = catalog.spec_of(m.ExecutionApproved).wildcard  # every approved execution
APPROVED_WEBSHOP = catalog.subject_for(m.ExecutionApproved, subject="webshop")
STEP = m.PlanStep(step_id="s1", action="restart_worker")


def approval() -> m.ExecutionApproved:
    return m.ExecutionApproved(execution_id=m.new_id(), plan_id="p1", step=STEP,
                               subject="webshop", producer="governor", not_after=2e9)


async def wait_violations(errors: list[str], subjects: list[str], within: float = 5.0) -> None:
    """Wait until error_cb has reported a permissions violation naming each subject."""
    deadline = time.monotonic() + within
    while True:
        # nats-py lowercases the server's -ERR text, so compare without case.
        seen = [e.lower() for e in errors if "permissions violation" in e.lower()]
        missing = [s for s in subjects if not any(f'"{s.lower()}"' in e for e in seen)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no permissions violation reported for {missing}; got {errors}")
        await asyncio.sleep(0.02)


async def stream_messages(bus: Bus, stream: str) -> int:
    admin = await bus.connect(catalog.ADMIN)
    info = await admin.jetstream().stream_info(stream)
    return int(info.state.messages)


async def landed(bus: Bus, stream: str, subject: str) -> bool:
    admin = await bus.connect(catalog.ADMIN)
    try:
        await admin.jetstream().get_last_msg(stream, subject)
    except NotFoundError:
        return False
    return True


def foreign_subjects(user: str) -> list[tuple[str, type[m.Event]]]:
    """Every concrete bus subject the catalog does not let `user` publish."""
    cases = []
    for spec in catalog.BUS_SUBJECTS:
        if "{actor}" in spec.pattern:
            # Per-actor subjects: each actor owns only its own token.
            for other in catalog.ACTORS:
                if other != user:
                    cases.append((spec.pattern.format(actor=other), spec.schema))
        elif user not in spec.publishers:
            concrete = spec.pattern.format(subject="webshop", outcome="vetoed")
            cases.append((concrete, spec.schema))
    return cases


def owned_subjects(user: str) -> list[str]:
    return [spec.pattern.format(subject="webshop", outcome="vetoed", actor=user)
            for spec in catalog.BUS_SUBJECTS if user in spec.publishers]


# --- approvals ----------------------------------------------------------------------


@pytest.mark.parametrize("user", USERS)
async def test_only_the_governor_may_publish_an_approved_execution(bus: Bus, user: str) -> None:
    errors: list[str] = []
    nc = await bus.connect(user, errors)
    event = approval()
    subject = catalog.bus_subject_of(event)
    js = nc.jetstream(timeout=0.5)
    if user == "governor":
        ack = await js.publish(subject, codec.encode(event), headers={"Nats-Msg-Id": event.id})
        assert ack.stream == EVENTS and ack.seq >= 1
        assert await landed(bus, EVENTS, subject)
        assert errors == []
        return
    with pytest.raises(nats.errors.TimeoutError):  # no PubAck: the publish never reached it
        await js.publish(subject, codec.encode(event), headers={"Nats-Msg-Id": event.id})
    await wait_violations(errors, [subject])
    assert not await landed(bus, EVENTS, subject)


# --- bus subjects owned by someone else ----------------------------------------------


@pytest.mark.parametrize("user", USERS)
async def test_a_user_cannot_publish_on_subjects_another_owns(bus: Bus, user: str) -> None:
    errors: list[str] = []
    nc = await bus.connect(user, errors)
    cases = foreign_subjects(user)
    assert cases
    for subject, _schema in cases:
        # A core publish is what a JetStream publish sends; the PubAck case is above.
        await nc.publish(subject, b'{"kind":"forged"}')
    await nc.flush()
    await wait_violations(errors, [s for s, _ in cases])
    for stream in catalog.STREAMS:
        assert await stream_messages(bus, stream.name) == 0, stream.name


@pytest.mark.parametrize("user", USERS)
async def test_a_user_can_publish_what_the_catalog_gives_it(bus: Bus, user: str) -> None:
    errors: list[str] = []
    nc = await bus.connect(user, errors)
    js = nc.jetstream(timeout=5)
    for subject in owned_subjects(user):
        ack = await js.publish(subject, b'{"kind":"probe"}')
        assert ack.seq >= 1, subject
    assert errors == []


# --- consumers -------------------------------------------------------------------------


@pytest.mark.parametrize("user", USERS)
async def test_a_user_cannot_pull_or_ack_another_actors_durable(bus: Bus, user: str) -> None:
    admin = await bus.connect(catalog.ADMIN)
    ajs = admin.jetstream()
    # One message waiting on every durable, so a successful pull would show.
    opened = m.IncidentOpened(invariant="p99", summary="slow", value=1, threshold=0.5,
                              subject="webshop", producer="detector")
    await ajs.publish(catalog.bus_subject_of(opened), codec.encode(opened))
    errors: list[str] = []
    nc = await bus.connect(user, errors)
    foreign = [c for c in catalog.CONSUMERS if c.actor != user]
    # The client API path first: bind needs no server call, the fetch is refused.
    first = next(c for c in foreign if c.stream == EVENTS)
    sub = await nc.jetstream().pull_subscribe_bind(durable=first.durable, stream=first.stream)
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(1, timeout=0.5)
    subjects = []
    for c in foreign:
        nxt = f"$JS.API.CONSUMER.MSG.NEXT.{c.stream}.{c.durable}"
        # A forged ack for stream seq 1, in both the v1 and the v2 (domain, hash) forms.
        ack_v1 = f"$JS.ACK.{c.stream}.{c.durable}.1.1.1.1700000000000000000.0"
        ack_v2 = f"$JS.ACK._.H.{c.stream}.{c.durable}.1.1.1.1700000000000000000.0.t"
        await nc.publish(nxt, b'{"batch":1}', reply=f"{inbox_prefix(user)}.x")
        await nc.publish(ack_v1, b"+ACK")
        await nc.publish(ack_v2, b"+ACK")
        subjects += [nxt, ack_v1, ack_v2]
    await nc.flush()
    await wait_violations(errors, subjects)
    for c in foreign:
        info = await ajs.consumer_info(c.stream, c.durable)
        assert info.delivered is not None and info.delivered.consumer_seq == 0, c.durable
        assert info.ack_floor is not None and info.ack_floor.stream_seq == 0, c.durable


@pytest.mark.parametrize("user", USERS)
async def test_a_user_cannot_create_a_consumer(bus: Bus, user: str) -> None:
    errors: list[str] = []
    nc = await bus.connect(user, errors)
    js = nc.jetstream(timeout=0.5)
    evil = api.ConsumerConfig(durable_name=f"evil_{user}", ack_policy=api.AckPolicy.EXPLICIT,
                              filter_subject=APPROVED_ANY)
    with pytest.raises(nats.errors.TimeoutError):
        await js.add_consumer(EVENTS, evil)
    named = api.ConsumerConfig(name=f"evil2_{user}", ack_policy=api.AckPolicy.EXPLICIT,
                               filter_subject=APPROVED_ANY)
    with pytest.raises(nats.errors.TimeoutError):
        await js.add_consumer(EVENTS, named)
    await wait_violations(errors, [
        f"$JS.API.CONSUMER.DURABLE.CREATE.{EVENTS}.evil_{user}",
        f"$JS.API.CONSUMER.CREATE.{EVENTS}.evil2_{user}.{APPROVED_ANY}",
    ])
    admin = await bus.connect(catalog.ADMIN)
    names = {c.name for c in await admin.jetstream().consumers_info(EVENTS)}
    assert names == {c.durable for c in catalog.CONSUMERS if c.stream == EVENTS}


async def test_the_operator_cannot_sneak_a_durable_through_the_ephemeral_endpoint(
        bus: Bus) -> None:
    nc = await bus.connect(catalog.OPERATOR)
    req = {"stream_name": EVENTS,
           "config": {"durable_name": "sneaky", "ack_policy": "explicit",
                      "filter_subject": APPROVED_ANY}}
    reply = await nc.request(f"$JS.API.CONSUMER.CREATE.{EVENTS}",
                             json.dumps(req).encode(), timeout=5)
    body = json.loads(reply.data)
    assert "error" in body, body  # the server itself refuses a durable name here
    admin = await bus.connect(catalog.ADMIN)
    with pytest.raises(NotFoundError):
        await admin.jetstream().consumer_info(EVENTS, "sneaky")


# --- subscriptions -----------------------------------------------------------------------


@pytest.mark.parametrize("user", USERS)
async def test_a_user_reads_only_its_own_inbox(bus: Bus, user: str) -> None:
    errors: list[str] = []
    nc = await bus.connect(user, errors)
    other = "governor" if user != "governor" else "executor"
    denied = [f"{inbox_prefix(other)}.>", "_INBOX.>", ">"]
    if user != catalog.OPERATOR:
        denied.append(catalog.EVERYTHING)
    got: dict[str, list[bytes]] = {}
    sentinel = asyncio.Event()
    for pattern in [*denied, f"{inbox_prefix(user)}.>"]:
        got[pattern] = []

        async def on_msg(msg: Msg, pattern: str = pattern) -> None:
            got[pattern].append(msg.data)
            if msg.data == b"sentinel":
                sentinel.set()

        await nc.subscribe(pattern, cb=on_msg)
    await nc.flush()
    await wait_violations(errors, denied)
    # Messages for others, then a sentinel for us: once it arrives, the others would have.
    admin = await bus.connect(catalog.ADMIN)
    await admin.publish(f"{inbox_prefix(other)}.reply", b"secret")
    await admin.publish(catalog.subject_for(m.ControlCommand), b"secret")
    await admin.publish(f"{inbox_prefix(user)}.sentinel", b"sentinel")
    await admin.flush()
    await asyncio.wait_for(sentinel.wait(), 5)
    assert got[f"{inbox_prefix(user)}.>"] == [b"sentinel"]
    assert all(got[p] == [] for p in denied)


async def test_the_operator_reads_the_whole_bus(bus: Bus) -> None:
    errors: list[str] = []
    nc = await bus.connect(catalog.OPERATOR, errors)
    sub = await nc.subscribe(catalog.EVERYTHING)
    await nc.flush()
    beat = m.Heartbeat(actor="planner", pid=1, started_at=0.0, producer="planner")
    planner = await bus.connect("planner")
    await planner.publish(catalog.bus_subject_of(beat), codec.encode(beat))
    msg = await sub.next_msg(timeout=5)
    assert msg.subject == catalog.subject_for(m.Heartbeat, actor="planner")
    assert errors == []


# --- the operator and the governor's bucket ---------------------------------------------


async def test_the_operator_publishes_approvals_and_control(bus: Bus) -> None:
    errors: list[str] = []
    nc = await bus.connect(catalog.OPERATOR, errors)
    js = nc.jetstream(timeout=5)
    for event in (m.HumanApproval(execution_id="x1", approved=True, producer="operator"),
                  m.ControlCommand(command="mode", mode="observe", producer="operator")):
        ack = await js.publish(catalog.bus_subject_of(event), codec.encode(event))
        assert ack.stream == EVENTS
    assert await stream_messages(bus, EVENTS) == 2
    assert errors == []


async def test_the_operator_writes_only_the_kill_key(bus: Bus) -> None:
    errors: list[str] = []
    nc = await bus.connect(catalog.OPERATOR, errors)
    kv = await nc.jetstream(timeout=0.5).key_value(catalog.GOVERNOR_BUCKET)
    flag = KillFlag(engaged=True, by="test", reason="drill", at=time.time())
    await kv.put(KILL_KEY, msgspec.json.encode(flag))
    entry = await kv.get(KILL_KEY)
    assert msgspec.json.decode(entry.value or b"", type=KillFlag).engaged
    for key in (MODE_KEY, revoked_key("x1")):
        with pytest.raises(nats.errors.TimeoutError):
            await kv.put(key, b"execute")
    await wait_violations(errors, [f"$KV.{catalog.GOVERNOR_BUCKET}.{MODE_KEY}",
                                   f"$KV.{catalog.GOVERNOR_BUCKET}.{revoked_key('x1')}"])
    with pytest.raises(KeyNotFoundError):
        await kv.get(MODE_KEY)
    ledger_errors: list[str] = []
    nc2 = await bus.connect(catalog.OPERATOR, ledger_errors)
    ledger = await nc2.jetstream(timeout=0.5).key_value(catalog.EXEC_LEDGER_BUCKET)
    with pytest.raises(nats.errors.TimeoutError):
        await ledger.create("x1", b"claimed")
    await wait_violations(ledger_errors, [f"$KV.{catalog.EXEC_LEDGER_BUCKET}.x1"])


@pytest.mark.parametrize("user", [a for a in catalog.ACTORS if a != "governor"])
async def test_no_actor_but_the_governor_writes_governor_state(bus: Bus, user: str) -> None:
    errors: list[str] = []
    admin = await bus.connect(catalog.ADMIN)
    kv = await admin.jetstream().key_value(catalog.GOVERNOR_BUCKET)
    provisioned = (await kv.get(KILL_KEY)).revision  # provisioning writes the first flag
    nc: Client = await bus.connect(user, errors)
    subjects = [f"$KV.{catalog.GOVERNOR_BUCKET}.{k}" for k in (MODE_KEY, KILL_KEY)]
    for s in subjects:
        await nc.publish(s, b"{}")
    await nc.flush()
    await wait_violations(errors, subjects)
    with pytest.raises(KeyNotFoundError):
        await kv.get(MODE_KEY)
    assert (await kv.get(KILL_KEY)).revision == provisioned


async def test_the_operator_cannot_launder_an_approval_through_a_push_consumer(
        bus: Bus) -> None:
    """The operator may write the kill key and create ephemeral consumers; together they
    must not let it deliver a forged ExecutionApproved onto the executor's subject."""
    nc = await bus.connect(catalog.OPERATOR)
    js = nc.jetstream(timeout=5)
    kv = await js.key_value(catalog.GOVERNOR_BUCKET)
    await kv.put(KILL_KEY, codec.encode(approval()))
    kv_stream = f"KV_{catalog.GOVERNOR_BUCKET}"
    key_subject = f"$KV.{catalog.GOVERNOR_BUCKET}.{KILL_KEY}"
    with contextlib.suppress(Exception):  # refusing to create it is a fine outcome too
        await js.add_consumer(kv_stream, api.ConsumerConfig(
            deliver_subject=APPROVED_WEBSHOP, filter_subject=key_subject,
            ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL))
    # A control consumer that delivers to the operator's own inbox: once it has, the
    # forged one has had its chance too.
    control = await nc.subscribe(f"{inbox_prefix(catalog.OPERATOR)}.control")
    await js.add_consumer(kv_stream, api.ConsumerConfig(
        deliver_subject=f"{inbox_prefix(catalog.OPERATOR)}.control", filter_subject=key_subject,
        ack_policy=api.AckPolicy.NONE, deliver_policy=api.DeliverPolicy.ALL))
    await control.next_msg(timeout=5)
    await asyncio.sleep(1.0)  # and one more second of chances
    assert not await landed(bus, EVENTS, APPROVED_WEBSHOP)
