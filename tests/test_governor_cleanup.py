"""The governor bucket stays bounded: keys that can no longer matter are deleted
(no bucket TTL: it would expire the kill flag and the mode)."""

from __future__ import annotations

import asyncio
import time

from actors.governor.actor import plan_key
from actors.runtime.kv import Bucket
from bus_schemas import catalog
from bus_schemas import messages as m
from bus_schemas.governor import revoked_key
from tests.harness import (
    KEEP_ENV,
    Bus,
    RecordingServer,
    approval_of,
    config_toml,
    plan_of,
    result_of,
    spawn_stopping_governor,
    start_crew,
    step,
)


async def gone(gkv: Bucket, key: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while await gkv.get_bytes(key) is not None:
        assert time.monotonic() < deadline, f"{key} was never deleted"
        await asyncio.sleep(0.1)


async def test_settled_pendings_and_ended_executions_revocations_are_deleted(
        bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url, mode="approve", approval_timeout_s=1.0,
                                 approval_ttl_s=0.5, slot_grace_s=0.5))
    await start_crew(bus, "governor")  # no executor: a released step expires unreported
    nc = await bus.connect(catalog.OPERATOR)
    gkv = Bucket(await nc.jetstream().key_value(catalog.GOVERNOR_BUCKET))
    timed_out, released = plan_of(step("enable_cache")), plan_of(step("recycle_pool"))
    async with bus.collect() as col:
        await bus.publish("planner", timed_out)
        await bus.publish("planner", released)
        waits = await col.wait_for(lambda e: isinstance(e, m.Decision)
                                   and e.outcome == "awaiting_approval", count=2)
        by_plan = {d.plan_id: d.execution_id for d in waits}
        await bus.publish(catalog.OPERATOR, m.HumanApproval(
            execution_id=by_plan[released.plan_id], approved=True, by="ana"))
        approved = await approval_of(col, released)
        await bus.publish(catalog.OPERATOR, m.ControlCommand(
            command="revoke", execution_id=approved.execution_id, by="ana"))
        await col.wait_for(lambda e: isinstance(e, m.Decision) and e.outcome == "denied")
        # Released, revoked and never run: its slot ends it, as the revocation it was.
        await col.wait_for(lambda e: isinstance(e, m.Decision) and e.outcome == "revoked"
                           and e.ends_step and e.execution_id == approved.execution_id)
    # Settled by the loop: deleted once published. (One a human settled is kept
    # SETTLED_KEEP_S, for a redelivery of the approval to re-emit.)
    await gone(gkv, f"pending.{by_plan[timed_out.plan_id]}")
    assert await gkv.get_bytes(f"pending.{by_plan[released.plan_id]}") is not None
    await gone(gkv, revoked_key(approved.execution_id))


async def test_a_plan_is_forgotten_only_after_all_its_steps_ended_and_its_keep_passed(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s["enable_cache"] = 3.0  # still running well past the keep
    bus.write_config(config_toml(actions.url))
    spawn_stopping_governor(bus, **{KEEP_ENV: "1.0"})
    await start_crew(bus, "executor")
    await bus.wait_heartbeat("governor")
    nc = await bus.connect(catalog.OPERATOR)
    gkv = Bucket(await nc.jetstream().key_value(catalog.GOVERNOR_BUCKET))
    plan = plan_of(step("enable_cache"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        approved = await approval_of(col, plan)
        await actions.wait_calls(1)
        await asyncio.sleep(2.0)  # twice the keep while the step runs: still remembered
        assert await gkv.get_bytes(plan_key(plan.plan_id)) is not None
        await result_of(col, approved.execution_id)
    await gone(gkv, plan_key(plan.plan_id))
