"""Races between the executor's pre-start checks and a kill or a revocation.

The executor runs in this process (the real Runtime and Executor against a real
nats-server), subclassed only to override `_reached`, the hook called at every
await point between the ledger claim and the action's start (PRESTART). At the
chosen point the test engages the kill switch (or revokes the execution) and
waits until the write is in KV and, where the executor has already read it, until
its watch has delivered it: the race lands in that window every time, not by luck.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from typing import Literal

import msgspec
import pytest

from actors.executor.actor import PRESTART, Executor
from actors.runtime import config as config_mod
from actors.runtime.credentials import password_env
from actors.runtime.kv import Bucket
from actors.runtime.process import Runtime
from bus_schemas import catalog
from bus_schemas import messages as m
from bus_schemas.governor import (
    KILL_KEY,
    MODE_KEY,
    KillFlag,
    Revocation,
    encode_kill,
    encode_mode,
    encode_revocation,
    revoked_key,
)
from tests.harness import Bus, Collector, RecordingServer, config_toml, result_of

Race = Literal["kill", "revoke"]


class RacingExecutor(Executor):
    """Engages `race` when the executor reaches `point`, once."""

    point = ""
    race: Race = "kill"
    bus: Bus
    reached: list[str]

    async def _reached(self, point: str) -> None:
        self.reached.append(point)
        if point != self.point:
            return
        nc = await self.bus.connect("governor")  # the governor writes kills and revocations
        gkv = Bucket(await nc.jetstream().key_value(catalog.GOVERNOR_BUCKET))
        eid = next(iter(self.running), "") or self._claimed
        if self.race == "kill":
            await gkv.put(KILL_KEY, encode_kill(KillFlag(engaged=True, by="tester",
                                                         reason="race", at=time.time())))
        else:
            await gkv.put(revoked_key(eid), encode_revocation(Revocation(
                execution_id=eid, by="tester", reason="race")))
        run = self.running.get(eid)
        if run is None:
            return  # before _execute registers it: the last look's `get`s must see it
        deadline = time.monotonic() + 10
        while run.cancel is None:  # the watch (or the poll) delivered it
            assert time.monotonic() < deadline, f"the executor never saw the {self.race}"
            await asyncio.sleep(0.005)

    async def handle(self, event: m.Event, delivery: object) -> list[m.Event]:  # type: ignore[override]
        if isinstance(event, m.ExecutionApproved):
            self._claimed = event.execution_id
        return list(await super().handle(event, delivery))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def executor_in_process(bus: Bus, actions: RecordingServer, point: str, race: Race,
                              monkeypatch: pytest.MonkeyPatch
                              ) -> AsyncIterator[type[RacingExecutor]]:
    path = bus.write_config(config_toml(actions.url))
    monkeypatch.setenv("MENDERS_HOME", str(bus.home))
    monkeypatch.setenv(password_env("executor"), bus.passwords["executor"])
    config = config_mod.load(path)
    config = msgspec.structs.replace(config, runtime=msgspec.structs.replace(
        config.runtime, metrics_base_port=0))
    nc = await bus.connect("governor")
    gkv = Bucket(await nc.jetstream().key_value(catalog.GOVERNOR_BUCKET))
    await gkv.put(MODE_KEY, encode_mode("execute"))  # what a governor in execute mode writes

    cls = type("Racing", (RacingExecutor,), {"point": point, "race": race, "bus": bus,
                                             "reached": [], "_claimed": ""})
    rt = Runtime("executor", config, url=bus.url)
    task = asyncio.create_task(rt.run(cls))
    try:
        await bus.wait_heartbeat("executor")
        yield cls
    finally:
        rt.stop()
        await asyncio.wait_for(task, 30)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def approval(action: str = "rotate_logs") -> m.ExecutionApproved:
    return m.ExecutionApproved(
        incident_id=m.new_id(), subject="shop", execution_id=m.new_id(), plan_id=m.new_id(),
        step=m.PlanStep(step_id="s1", action=action, idempotent=True, timeout_s=10.0),
        not_after=time.time() + 60)


async def one_execution(bus: Bus, col: Collector) -> m.ExecutionResult:
    approved = approval()
    await bus.publish("governor", approved)
    return await result_of(col, approved.execution_id)


@pytest.mark.parametrize("race", ["kill", "revoke"])
@pytest.mark.parametrize("point", PRESTART)
async def test_a_kill_or_revocation_before_the_start_means_it_never_starts(
        bus: Bus, actions: RecordingServer, monkeypatch: pytest.MonkeyPatch,
        point: str, race: Race) -> None:
    actions.block_s["rotate_logs"] = 30.0
    async with executor_in_process(bus, actions, point, race, monkeypatch) as cls, \
            bus.collect() as col:
        res = await one_execution(bus, col)
    assert point in cls.reached, f"the executor never reached {point}: {cls.reached}"
    assert res.status == "skipped", (point, race, res)
    assert res.rule == ("kill" if race == "kill" else "revoked"), res
    assert ("kill switch engaged by tester: race" if race == "kill"
            else "revoked by tester: race") in res.detail
    assert actions.count() == 0, f"the action ran although the {race} landed at {point}"


async def test_every_prestart_point_is_reached_on_a_clean_run(
        bus: Bus, actions: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    async with executor_in_process(bus, actions, "", "kill", monkeypatch) as cls, \
            bus.collect() as col:
        res = await one_execution(bus, col)
    assert res.status == "succeeded"
    assert cls.reached == list(PRESTART)
    assert actions.count() == 1
