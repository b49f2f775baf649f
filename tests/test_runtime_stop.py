"""A graceful stop keeps the executor able to hear a kill or a revocation (issue 8, hole 2).

On SIGTERM the runtime stops fetching and lets in-flight handlers finish; the
actor's background loops (for the executor: the kill watch, the revocation
watch and the poll) and the heartbeats keep running until every consumer has
drained. These tests run the real executor and governor processes against a
real nats-server and a recording action server whose action blocks for 30 s.

The race window is made explicit: the test waits until the executor has
logged "stopping" (written in the SIGTERM handler, before anything is torn
down) and only then engages the kill or revokes.
"""

from __future__ import annotations

from actors.cli import operator
from bus_schemas import catalog
from bus_schemas import messages as m
from tests.harness import (
    Bus,
    RecordingServer,
    config_toml,
    one_running_step,
    result_of,
    start_crew,
)

BLOCK_S = 30.0  # the action's own duration: far beyond every bound below


async def test_a_kill_during_a_graceful_stop_still_cancels_the_running_action(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s["rotate_logs"] = BLOCK_S
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor")
    executor = bus.spawn("executor")
    await bus.wait_heartbeat("executor")
    async with bus.collect() as col:
        approved = await one_running_step(bus, col, actions)
        executor.proc.terminate()  # SIGTERM: a rolling restart, a Ctrl-C
        await executor.wait_log("stopping", within=10)
        nc = await bus.connect(catalog.OPERATOR)
        await operator.engage_kill(nc, "tester", "stop during drain")
        res = await result_of(col, approved.execution_id, within=5)
    assert res.status == "cancelled", res
    assert "kill switch engaged by tester: stop during drain" in res.detail
    assert await executor.exit_code() == 0, executor.log()[-3000:]
    assert actions.count("rotate_logs") == 1


async def test_a_revocation_during_a_graceful_stop_still_cancels_the_running_action(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s["rotate_logs"] = BLOCK_S
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor")
    executor = bus.spawn("executor")
    await bus.wait_heartbeat("executor")
    async with bus.collect() as col:
        approved = await one_running_step(bus, col, actions)
        executor.proc.terminate()
        await executor.wait_log("stopping", within=10)
        await bus.publish(catalog.OPERATOR, m.ControlCommand(
            command="revoke", execution_id=approved.execution_id, by="tester",
            reason="wrong fix"))
        res = await result_of(col, approved.execution_id, within=5)
    assert res.status == "cancelled", res
    assert "revoked by tester: wrong fix" in res.detail
    assert await executor.exit_code() == 0, executor.log()[-3000:]


async def test_heartbeats_go_on_while_a_stopping_actor_drains(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s["rotate_logs"] = BLOCK_S
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor")
    executor = bus.spawn("executor")
    await bus.wait_heartbeat("executor")
    async with bus.collect() as col:
        approved = await one_running_step(bus, col, actions)
        executor.proc.terminate()
        await executor.wait_log("stopping", within=10)
        beat = await bus.wait_heartbeat("executor", timeout=5)
        assert beat.in_flight == 1  # still beating, and still holding the execution
        nc = await bus.connect(catalog.OPERATOR)
        await operator.engage_kill(nc, "tester", "done")
        await result_of(col, approved.execution_id, within=5)
    assert await executor.exit_code() == 0, executor.log()[-3000:]
