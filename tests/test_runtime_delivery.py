"""The runtime's delivery discipline, observed on a real bus with real processes.

The tests run tests/fixture_actor.py: the real Runtime under the diagnoser's
name and credentials, with a handler whose behaviour the test picks. Bad
payloads on every consumed subject, to every real consuming actor, are the bus
fuzzer's (bench/fuzz_bus.py, tests/test_fuzz_bus.py); what admission says of
each kind of bad payload is tests/test_admission.py's.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nats.js import api
from prometheus_client.parser import text_string_to_metric_families

from actors.runtime.config import RuntimeConfig
from actors.stack.provision import consumer_config
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from tests.harness import REPO, ActorProc, Bus

ACTOR = "diagnoser"
CONSUMER = catalog.consumers_of(ACTOR)[0]
FIXTURE = REPO / "tests" / "fixture_actor.py"
MAX_BYTES = RuntimeConfig().max_message_bytes
T = TypeVar("T")

# Quick retries so that a message can exhaust its delivery limit within the test.
CONFIG = "[runtime]\nnak_backoff_s = [0.05]\nheartbeat_s = 0.25\n"


def spawn_fixture(bus: Bus, mode: str, record: Path) -> ActorProc:
    log_path = bus.home / f"fixture-{len(bus.procs)}.log"
    env = bus.env_for(ACTOR, FIXTURE_ACTOR=ACTOR, FIXTURE_MODE=mode,
                      FIXTURE_RECORD=str(record), MENDERS_METRICS_PORT="0")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(FIXTURE)], env=env, stdout=out,
                                stderr=out, stdin=subprocess.DEVNULL, cwd=REPO)
    ap = ActorProc(ACTOR, proc, log_path)
    bus.procs.append(ap)  # the bus fixture stops it
    return ap


def incident(**kw: Any) -> m.IncidentOpened:
    return m.IncidentOpened(invariant="p99_latency", summary="slow", value=0.9, threshold=0.25,
                            subject="webshop", producer="detector", incident_id=m.new_id(),
                            **kw)


async def publish(bus: Bus, event: m.Event) -> int:
    return await bus.publish_raw(catalog.bus_subject_of(event), codec.encode(event))


def lines(record: Path) -> list[tuple[str, str, int]]:
    if not record.exists():
        return []
    out = []
    for line in record.read_text().splitlines():
        what, event_id, delivery = line.split()
        out.append((what, event_id, int(delivery)))
    return out


async def eventually(what: str, probe: Callable[[], Awaitable[T | None]],
                     within: float = 20.0, proc: ActorProc | None = None) -> T:
    """Poll `probe` until it returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            tail = proc.log()[-3000:] if proc else ""
            raise AssertionError(f"{what}: not within {within:g}s\n{tail}")
        await asyncio.sleep(0.05)


def recorded(record: Path, what: str, event_id: str, count: int = 1
             ) -> Callable[[], Awaitable[list[tuple[str, str, int]] | None]]:
    async def probe() -> list[tuple[str, str, int]] | None:
        found = [ln for ln in lines(record) if ln[0] == what and ln[1] == event_id]
        return found if len(found) >= count else None
    return probe


async def consumer_info(bus: Bus, c: catalog.Consumer = CONSUMER) -> api.ConsumerInfo:
    admin = await bus.connect(catalog.ADMIN)
    return await admin.jetstream().consumer_info(c.stream, c.durable)


async def settled(bus: Bus, seq: int, c: catalog.Consumer = CONSUMER) -> api.ConsumerInfo | None:
    """The consumer has acked (or terminated) everything up to stream seq `seq`."""
    info = await consumer_info(bus, c)
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    done = floor >= seq and not info.num_ack_pending and not info.num_pending
    return info if done else None


async def metrics_of(port: int) -> dict[str, float]:
    """Every sample on the actor's /metrics, keyed `name{label=value,...}`."""
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def sample(metrics: dict[str, float], name: str, **labels: str) -> float:
    key = f"{name}{{{','.join(f'{k}={v}' for k, v in sorted(labels.items()))}}}"
    return metrics.get(key, 0.0)


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "handled.txt"


# --- ack, nak, dead letter -------------------------------------------------------------


async def test_a_handled_message_is_acked_once(bus: Bus, record: Path) -> None:
    bus.write_config(CONFIG)
    proc = spawn_fixture(bus, "ok", record)
    beat = await bus.wait_heartbeat(ACTOR)
    event = incident()
    seq = await publish(bus, event)
    await eventually("handled", recorded(record, "done", event.id), proc=proc)
    info = await eventually("acked", lambda: settled(bus, seq), proc=proc)
    assert info.num_redelivered == 0
    assert [ln[0] for ln in lines(record)] == ["start", "done"]  # exactly once
    metrics = await metrics_of(beat.metrics_port)
    assert sample(metrics, "menders_messages_handled_total", actor=ACTOR,
                  kind="incident.opened", outcome="ack") == 1
    assert sample(metrics, "menders_redeliveries_total", actor=ACTOR,
                  consumer=CONSUMER.durable) == 0


async def test_a_failing_handler_is_nakked_and_the_message_redelivered(
        bus: Bus, record: Path) -> None:
    bus.write_config(CONFIG)
    proc = spawn_fixture(bus, "fail:2", record)
    beat = await bus.wait_heartbeat(ACTOR)
    event = incident()
    seq = await publish(bus, event)
    done = await eventually("handled after two failures", recorded(record, "done", event.id),
                            proc=proc)
    assert done == [("done", event.id, 3)]
    starts = [d for what, eid, d in lines(record) if what == "start" and eid == event.id]
    assert starts == [1, 2, 3]
    await eventually("acked", lambda: settled(bus, seq), proc=proc)
    metrics = await metrics_of(beat.metrics_port)
    assert sample(metrics, "menders_redeliveries_total", actor=ACTOR,
                  consumer=CONSUMER.durable) == 2
    assert sample(metrics, "menders_messages_handled_total", actor=ACTOR,
                  kind="incident.opened", outcome="nak") == 2
    assert sample(metrics, "menders_messages_handled_total", actor=ACTOR,
                  kind="incident.opened", outcome="ack") == 1


async def test_a_message_failing_past_its_delivery_limit_is_dead_lettered(
        bus: Bus, record: Path) -> None:
    bus.write_config(CONFIG)
    proc = spawn_fixture(bus, "always_fail", record)
    beat = await bus.wait_heartbeat(ACTOR)
    event = incident()
    async with bus.collect(catalog.subject_for(m.DeadLetter, actor=ACTOR)) as dlq:
        seq = await publish(bus, event)
        [letter] = await dlq.wait_for(lambda e: isinstance(e, m.DeadLetter))
    assert letter.stream_seq == seq and letter.consumer == CONSUMER.durable
    assert letter.bus_subject == catalog.bus_subject_of(event)
    assert letter.deliveries == CONSUMER.max_deliver
    assert f"failed {CONSUMER.max_deliver} deliveries" in letter.reason
    assert "this handler always fails" in letter.reason
    assert event.id in letter.payload_head
    await eventually("terminated", lambda: settled(bus, seq), proc=proc)
    starts = [ln for ln in lines(record) if ln[0] == "start"]
    assert [d for _, _, d in starts] == list(range(1, CONSUMER.max_deliver + 1))
    assert proc.alive()
    await bus.wait_heartbeat(ACTOR)  # still beating after
    metrics = await metrics_of(beat.metrics_port)
    assert sample(metrics, "menders_dead_letters_total", actor=ACTOR,
                  consumer=CONSUMER.durable) == 1
    # The original stays in its stream for a human to find.
    admin = await bus.connect(catalog.ADMIN)
    original = await admin.jetstream().get_msg(CONSUMER.stream, seq)
    assert original.data is not None and event.id.encode() in original.data


# --- crashes and clean stops ---------------------------------------------------------


async def _with_short_ack_wait(bus: Bus, mode: str, record: Path) -> ActorProc:
    """The fixture actor in `mode`, its consumer's ack wait set to 2 s on the server."""
    bus.write_config(CONFIG)
    admin = await bus.connect(catalog.ADMIN)
    cfg = consumer_config(CONSUMER)
    cfg.ack_wait = 2.0
    await admin.jetstream().add_consumer(CONSUMER.stream, cfg)
    proc = spawn_fixture(bus, mode, record)
    await bus.wait_heartbeat(ACTOR)
    return proc


async def test_a_message_in_the_hands_of_a_killed_actor_is_redelivered(
        bus: Bus, record: Path) -> None:
    # A short AckWait so that the killed actor's messages come back quickly.
    first = await _with_short_ack_wait(bus, "sleep:60", record)
    events = [incident() for _ in range(3)]
    seqs = [await publish(bus, e) for e in events]
    for e in events:
        await eventually("in the handler", recorded(record, "start", e.id), proc=first)
    first.kill()
    assert not any(ln[0] == "done" for ln in lines(record))
    second = spawn_fixture(bus, "ok", record)
    for e in events:
        done = await eventually("redelivered", recorded(record, "done", e.id), proc=second)
        assert done[0][2] >= 2  # a redelivery, not a new message
    await eventually("all acked", lambda: settled(bus, max(seqs)), proc=second)
    for e in events:
        assert len([ln for ln in lines(record) if ln[0] == "done" and ln[1] == e.id]) == 1


async def test_a_handler_longer_than_the_ack_wait_keeps_its_message(
        bus: Bus, record: Path) -> None:
    # The server's ack wait (2 s, as an operator might set it with `nats consumer edit`)
    # is what the runtime keeps alive against, not the catalog's: a 5 s handler's
    # message is neither redelivered nor handled twice.
    proc = await _with_short_ack_wait(bus, "sleep:5", record)
    event = incident()
    seq = await publish(bus, event)
    await eventually("handled", recorded(record, "done", event.id), proc=proc)
    await eventually("acked", lambda: settled(bus, seq), proc=proc)
    assert [ln[0] for ln in lines(record)] == ["start", "done"]
    info = await consumer_info(bus)
    assert info.num_redelivered == 0 and not info.num_ack_pending


async def test_sigterm_finishes_the_message_in_hand_then_exits_0(
        bus: Bus, record: Path) -> None:
    bus.write_config(CONFIG)
    proc = spawn_fixture(bus, "sleep:1", record)
    await bus.wait_heartbeat(ACTOR)
    event = incident()
    seq = await publish(bus, event)
    await eventually("in the handler", recorded(record, "start", event.id), proc=proc)
    proc.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.proc.wait, 30)
    assert code == 0, proc.log()[-3000:]
    assert [ln[0] for ln in lines(record)] == ["start", "done"]
    info = await consumer_info(bus)
    assert info.ack_floor is not None and info.ack_floor.stream_seq == seq
    assert not info.num_ack_pending
    assert info.num_redelivered == 0
