"""Execution ownership is a lease in the ledger, never `pid@host`.

Real executor processes on a real nats-server. An owner renews its claim while
the step runs; another executor that gets the approval (a redelivery after the
owner stopped acking) waits while the claim keeps changing and settles it only
once no renewal came for the lease: `unknown` for a non-idempotent step, a
re-run for an idempotent one. A SIGSTOPped owner is a live owner that looks
dead and a dead one that looks alive, depending on how long it stays stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from bus_schemas import catalog
from bus_schemas import messages as m
from tests.harness import (
    ActorProc,
    Bus,
    Collector,
    RecordingServer,
    approval_of,
    config_toml,
    one_running_step,
    plan_of,
    result_of,
    start_crew,
    step,
)


def lease_config(url: str, lease_s: float) -> str:
    return config_toml(url) + f"[executor]\nlease_s = {lease_s}\n"


async def beating(bus: Bus, proc: ActorProc, within: float = 20.0) -> None:
    """Until `proc` itself (not another executor) sends a heartbeat."""
    deadline = time.monotonic() + within
    while (await bus.wait_heartbeat("executor", timeout=within)).pid != proc.pid:
        assert time.monotonic() < deadline, f"no heartbeat from pid {proc.pid}"


def results_of(col: Collector, eid: str) -> list[m.ExecutionResult]:
    return [e for e in col.events(m.ExecutionResult) if e.execution_id == eid]


async def claim_as(bus: Bus, approved: m.ExecutionApproved, owner: str) -> None:
    """Write the claim a crashed executor would have left (the pre-lease format: no lease)."""
    nc = await bus.connect("executor")
    kv = await nc.jetstream().key_value(catalog.EXEC_LEDGER_BUCKET)
    entry = {"execution_id": approved.execution_id, "plan_id": approved.plan_id,
             "subject": approved.subject, "action": approved.step.action,
             "idempotent": approved.step.idempotent, "state": "claimed", "attempts": 1,
             "owner": owner, "claimed_at": time.time()}
    await kv.create(approved.execution_id, json.dumps(entry).encode())


@pytest.mark.parametrize("action,status,calls", [("restart_worker", "unknown", 0),
                                                 ("rotate_logs", "succeeded", 1)])
async def test_a_claim_left_by_the_same_pid_and_host_is_settled_once_its_lease_lapses(
        bus: Bus, actions: RecordingServer, action: str, status: str, calls: int) -> None:
    # In a container the executor is PID 1 and restarts as PID 1 on the same host: the
    # old `os.kill(1, 0)` probe found its dead predecessor alive, forever.
    bus.write_config(lease_config(actions.url, 1.0))
    await start_crew(bus, "governor")
    plan = plan_of(step(action))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        approved = await approval_of(col, plan)
        await claim_as(bus, approved, f"1@{socket.gethostname()}/{time.time() - 5:.6f}")
        await start_crew(bus, "executor")
        res = await result_of(col, approved.execution_id, within=30)
    assert res.status == status, res
    assert actions.count(action) == calls


async def test_a_stopped_owner_with_a_fresh_lease_is_waited_for_not_reported_or_rerun(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s["rotate_logs"] = 1.0
    bus.write_config(lease_config(actions.url, 60.0))
    await start_crew(bus, "governor")
    owner = bus.spawn("executor")
    await bus.wait_heartbeat("executor")
    async with bus.collect() as col:
        approved = await one_running_step(bus, col, actions)
        other = bus.spawn("executor")
        await beating(bus, other)
        os.kill(owner.pid, signal.SIGSTOP)
        try:
            # The owner stops acking: after ack_wait the approval goes to the other one,
            # which finds a claim whose lease is still fresh and waits on it.
            await other.wait_log("waiting on another executor's lease")
            assert results_of(col, approved.execution_id) == []
            assert actions.count() == 1
        finally:
            os.kill(owner.pid, signal.SIGCONT)
        res = await result_of(col, approved.execution_id, within=30)
        await other.wait_log("already done: republishing the recorded result")
    assert res.status in ("succeeded", "timed_out"), res  # the owner's own outcome
    assert {r.id for r in results_of(col, approved.execution_id)} == {res.id}
    assert actions.count() == 1, "the waiting executor re-ran a step whose owner was alive"


@pytest.mark.parametrize("action,status,calls", [("restart_worker", "unknown", 1),
                                                 ("rotate_logs", "succeeded", 2)])
async def test_a_stopped_owner_whose_lease_lapsed_is_settled_and_stands_down(
        bus: Bus, actions: RecordingServer, action: str, status: str, calls: int) -> None:
    actions.block_s[action] = 60.0
    bus.write_config(lease_config(actions.url, 1.0))
    await start_crew(bus, "governor")
    owner = bus.spawn("executor")
    await bus.wait_heartbeat("executor")
    async with bus.collect() as col:
        approved = await one_running_step(bus, col, actions, action)
        if calls == 2:
            actions.block_s[action] = 0.0  # the re-run answers at once
        other = bus.spawn("executor")
        await beating(bus, other)
        os.kill(owner.pid, signal.SIGSTOP)
        try:
            res = await result_of(col, approved.execution_id, within=40)
            await other.wait_log("lease lapsed: its owner is gone")
        finally:
            os.kill(owner.pid, signal.SIGCONT)
        # Back to life, the owner's next renewal fails: it stops its action and reports
        # nothing of its own (the settler's outcome stands).
        await owner.wait_log("lost the ledger lease: another executor settled this execution")
    assert res.status == status, res
    assert {r.id for r in results_of(col, approved.execution_id)} == {res.id}
    assert {r.status for r in results_of(col, approved.execution_id)} == {status}
    assert actions.count(action) == calls


async def test_sigkill_mid_idempotent_step_reruns_it_once_its_lease_lapses(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s["rotate_logs"] = 60.0
    bus.write_config(lease_config(actions.url, 1.0))
    await start_crew(bus, "governor")
    owner = bus.spawn("executor")
    await bus.wait_heartbeat("executor")
    async with bus.collect() as col:
        approved = await one_running_step(bus, col, actions)
        actions.block_s["rotate_logs"] = 0.0
        owner.kill()
        await start_crew(bus, "executor")
        res = await result_of(col, approved.execution_id, within=40)
    assert res.status == "succeeded"
    assert actions.count("rotate_logs") == 2  # the lost attempt and its re-run
