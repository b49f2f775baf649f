"""A runtime worker that fails ends the process, and a stuck one shows (issue 8, hole 5).

In-process Runtimes under the diagnoser's name and credentials (its `diagnoser`
durable has concurrency 4, so its messages go through the worker pool) against
a real nats-server. The failure is injected outside the handler: a Runtime
subclass whose dead-letter publish fails, so the worker dies in the runtime's
own code, past the handler's try.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from actors.cli import operator
from actors.runtime import Actor, Delivery, Reject, Runtime
from actors.runtime.config import Config, RuntimeConfig
from actors.runtime.process import ActorCrashed
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.natsconf import password_env
from tests.harness import REPO, ActorProc, Bus

ACTOR = "diagnoser"
CONSUMER = catalog.consumers_of(ACTOR)[0]
HEARTBEAT_S = 0.2
BOUND_S = 20.0  # how long Runtime.run may take to end once a worker failed


class DeadLetterBroken(RuntimeError):
    pass


class BrokenDeadLetters(Runtime):
    """The injected failure: every dead-letter publish fails (after the handler's try)."""

    async def publish(self, event: m.Event) -> None:
        if isinstance(event, m.DeadLetter):
            raise DeadLetterBroken(f"dead-letter publish refused for seq {event.stream_seq}")
        await super().publish(event)


class Rejecting(Actor):
    name = ACTOR

    async def handle(self, event: m.Event, delivery: Delivery) -> Sequence[m.Event]:
        raise Reject("never acceptable")


class Blocking(Actor):
    """Holds every message until the test releases it."""

    name = ACTOR
    entered: asyncio.Event
    release: asyncio.Event

    async def handle(self, event: m.Event, delivery: Delivery) -> Sequence[m.Event]:
        Blocking.entered.set()
        await Blocking.release.wait()
        return ()


def config(bus: Bus) -> Config:
    return Config(home=str(bus.home), runtime=RuntimeConfig(
        heartbeat_s=HEARTBEAT_S, nak_backoff_s=[0.05], metrics_base_port=0))


@pytest.fixture
def creds(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(password_env(ACTOR), bus.passwords[ACTOR])


def incident() -> m.IncidentOpened:
    return m.IncidentOpened(invariant="p99_latency", summary="slow", value=0.9, threshold=0.25,
                            subject="webshop", producer="detector", incident_id=m.new_id())


async def publish(bus: Bus, event: m.Event) -> None:
    await bus.publish_raw(catalog.bus_subject_of(event), codec.encode(event))


async def beat_where(bus: Bus, pred: Any, timeout: float = 10.0) -> m.Heartbeat:
    """The first heartbeat of the actor, from now on, for which `pred` holds."""
    nc = await bus.connect(catalog.OPERATOR)
    sub = await nc.subscribe(catalog.subject_for(m.Heartbeat, actor=ACTOR))
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await sub.next_msg(timeout=timeout)
                beat = codec.decode(msg.data, (m.Heartbeat,))
                assert isinstance(beat, m.Heartbeat)
                if pred(beat):
                    return beat
    finally:
        await sub.unsubscribe()


async def test_a_worker_that_fails_outside_its_handler_ends_the_process(
        bus: Bus, creds: None) -> None:
    assert CONSUMER.concurrency > 1  # the worker pool, not the inline path
    rt = BrokenDeadLetters(ACTOR, config(bus), url=bus.url)
    run = asyncio.create_task(rt.run(Rejecting))
    try:
        await beat_where(bus, lambda b: True)
        for _ in range(CONSUMER.concurrency):  # enough to kill every worker of the old pool
            await publish(bus, incident())
        done, _ = await asyncio.wait({run}, timeout=BOUND_S)
        assert done, (f"Runtime.run still running {BOUND_S:g}s after its workers failed: "
                      "it hangs while its heartbeat says alive")
        with pytest.raises(ActorCrashed) as info:
            run.result()
        assert isinstance(info.value.__cause__, BaseExceptionGroup)
        matched, _ = info.value.__cause__.split(DeadLetterBroken)
        assert matched is not None, info.value.__cause__
        assert "dead-letter publish refused" in str(info.value)
    finally:
        run.cancel()  # a hung run cannot be awaited: its finally blocks on the dead queue


def spawn_broken_fixture(bus: Bus) -> ActorProc:
    """tests/fixture_actor.py as a real process: it rejects, and its dead-letter publish fails."""
    log_path = bus.home / "fixture.log"
    env = bus.env_for(ACTOR, FIXTURE_ACTOR=ACTOR, FIXTURE_MODE="reject",
                      FIXTURE_BREAK="dead_letter", MENDERS_METRICS_PORT="0")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fixture_actor.py")],
                                env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                cwd=REPO)
    ap = ActorProc(ACTOR, proc, log_path)
    bus.procs.append(ap)  # the bus fixture stops it if it is still running
    return ap


async def test_an_actor_process_whose_worker_fails_exits_non_zero_with_the_traceback_logged(
        bus: Bus) -> None:
    ap = spawn_broken_fixture(bus)
    proc = ap.proc
    await bus.wait_heartbeat(ACTOR)
    await publish(bus, incident())
    code = await asyncio.to_thread(proc.wait, BOUND_S)
    assert code != 0, ap.log()[-3000:]
    crashed = [json.loads(ln) for ln in ap.log().splitlines()
               if ln.startswith("{") and '"crashed' in ln]
    assert crashed and crashed[0]["level"] == "critical", ap.log()[-3000:]
    assert "Traceback" in crashed[0]["exc"]
    assert "injected: dead-letter publish fails" in crashed[0]["exc"]


async def test_the_heartbeat_shows_the_oldest_in_flight_message_and_status_flags_it_stuck(
        bus: Bus, creds: None) -> None:
    Blocking.entered, Blocking.release = asyncio.Event(), asyncio.Event()
    rt = Runtime(ACTOR, config(bus), url=bus.url)
    run = asyncio.create_task(rt.run(Blocking))
    try:
        first = await beat_where(bus, lambda b: True)
        assert first.oldest_in_flight_s == 0.0 and first.in_flight == 0
        await publish(bus, incident())
        await asyncio.wait_for(Blocking.entered.wait(), 10)
        early = await beat_where(bus, lambda b: b.in_flight == 1)
        later = await beat_where(bus, lambda b: b.oldest_in_flight_s >= early.oldest_in_flight_s
                                 + 3 * HEARTBEAT_S)
        assert later.in_flight == 1  # the same message, older: it grows while held

        nc = await bus.connect(catalog.OPERATOR)
        threshold = later.oldest_in_flight_s / 2
        st = await operator.status(nc, HEARTBEAT_S, stuck_after=threshold)
        mine = st.actors[ACTOR]
        assert mine["alive"] and mine["stuck"], mine
        assert mine["oldest_in_flight_s"] >= later.oldest_in_flight_s
        assert not st.healthy
        # The default threshold is far above a second or two of holding.
        assert not (await operator.status(nc, HEARTBEAT_S)).actors[ACTOR]["stuck"]

        # `menders status`, text and --json, as the operator runs it.
        env = bus.env_for(catalog.OPERATOR)
        text, _ = await menders(env, "status", "--stuck-after", f"{threshold:g}")
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(ACTOR))
        assert "STUCK" in line and "oldest in flight" in line, text
        out, _ = await menders(env, "status", "--json", "--stuck-after", f"{threshold:g}")
        doc = json.loads(out)
        assert doc["actors"][ACTOR]["stuck"] is True
        assert doc["actors"][ACTOR]["oldest_in_flight_s"] >= threshold
        assert doc["actors"][ACTOR]["stuck_after_s"] == pytest.approx(threshold)

        Blocking.release.set()
        await beat_where(bus, lambda b: b.in_flight == 0 and b.oldest_in_flight_s == 0.0)
        st = await operator.status(nc, HEARTBEAT_S, stuck_after=threshold)
        assert not st.actors[ACTOR]["stuck"]
    finally:
        Blocking.release.set()
        rt.stop()
        await asyncio.wait_for(run, 15)


async def menders(env: dict[str, str], *args: str) -> tuple[str, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return out.decode(), proc.returncode
