"""Plans in waves, with a real governor and executor on a real nats-server: a kill in
wave 2 of 3, blast radius across and within plans, and how a plan's end is reported."""

from __future__ import annotations

import asyncio

import pytest

from actors.cli import operator
from bus_schemas import catalog
from bus_schemas import messages as m
from tests.harness import (
    Bus,
    Collector,
    RecordingServer,
    approval_of,
    config_toml,
    plan_of,
    start_crew,
    step,
)

pytestmark = pytest.mark.timeout(90)


async def ended(col: Collector, plan: m.Plan, within: float = 30.0) -> m.PlanEnded:
    [e] = await col.wait_for(lambda e: isinstance(e, m.PlanEnded)
                             and e.plan_id == plan.plan_id, within)
    return e  # type: ignore[no-any-return]


def waves_of(col: Collector, plan: m.Plan) -> list[tuple[int, str]]:
    return [(e.wave, e.state) for e in col.events(m.PlanProgressed)
            if e.plan_id == plan.plan_id]


async def test_a_kill_in_wave_two_of_three_cancels_it_and_starts_nothing_of_wave_three(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s |= {"failover_dependency": 20.0, "rotate_logs": 20.0}
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor", "executor")
    plan = plan_of(step("enable_cache", "a"),
                   step("failover_dependency", "b", depends_on=["a"]),
                   step("rotate_logs", "c", depends_on=["a"], mode="async"),
                   step("recycle_pool", "d", depends_on=["b"]),
                   step("scale_pool", "e", depends_on=["c"], params={"size": 8}))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        await approval_of(col, plan, "b")
        await approval_of(col, plan, "c")  # async, beside b in wave 2
        await actions.wait_calls(3)  # a done; b and c in the subject's hands
        nc = await bus.connect(catalog.OPERATOR)
        await operator.engage_kill(nc, "tester", "drill")
        end = await ended(col, plan)
    assert actions.calls[0].action == "enable_cache"
    assert sorted(c.action for c in actions.calls) == ["enable_cache", "failover_dependency",
                                                       "rotate_logs"]
    got = {s.step_id: s for s in end.steps}
    assert got["a"].ended == "succeeded"
    assert got["b"].ended == got["c"].ended == "cancelled" and got["b"].released
    assert "kill switch engaged by tester: drill" in got["b"].detail
    for later in ("d", "e"):  # wave 3: skipped, never released
        assert got[later].ended == "skipped" and got[later].rule == "dependency"
        assert not got[later].released
    assert {a.step.step_id for a in col.events(m.ExecutionApproved)
            if a.plan_id == plan.plan_id} == {"a", "b", "c"}
    assert end.outcome == "failed" and end.deciding is not None
    assert end.deciding.step_id in ("b", "c") and end.deciding.ended == "cancelled"
    # Waves 1 and 2 started and finished; wave 3 never started.
    assert waves_of(col, plan) == [(1, "started"), (1, "finished"), (2, "started"),
                                   (2, "finished")]
    assert all(e.waves == 3 for e in col.events(m.PlanProgressed) if e.plan_id == plan.plan_id)


async def test_a_plans_disruptive_steps_take_turns_and_another_plans_is_vetoed(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s["restart_worker"] = 1.5
    bus.write_config(config_toml(actions.url, action_cooldown_s=60))
    await start_crew(bus, "governor", "executor")
    # Two disruptive steps in one wave: one at a time, and not each other's cooldown.
    mine = plan_of(step("restart_worker", "r1"), step("restart_worker", "r2"),
                   step("enable_cache", "beside"))
    other = plan_of(step("restart_worker", "theirs"))
    async with bus.collect() as col:
        await bus.publish("planner", mine)
        first = await approval_of(col, mine, "r1")
        await approval_of(col, mine, "beside")  # not disruptive: not held
        await actions.wait_calls(1)
        await bus.publish("planner", other)
        [veto] = await col.wait_for(lambda e: isinstance(e, m.Decision)
                                    and e.plan_id == other.plan_id)
        assert not [a for a in col.events(m.ExecutionApproved)
                    if a.plan_id == mine.plan_id and a.step.step_id == "r2"]
        second = await approval_of(col, mine, "r2")
        end = await ended(col, mine)
    assert (veto.outcome, veto.rule) == ("vetoed", "blast_radius")
    assert "disruptive step(s) already in flight on 'shop' (restart_worker; max 1)" in \
        veto.reason
    r1 = next(r for r in col.events(m.ExecutionResult) if r.execution_id == first.execution_id)
    assert second.ts >= r1.ts  # released only once r1 had ended
    assert end.outcome == "succeeded" and end.deciding is None
    assert actions.count("restart_worker") == 2
    other_end = await ended(col, other)
    assert other_end.outcome == "blocked" and other_end.deciding is not None
    assert other_end.deciding.rule == "blast_radius"


async def test_a_plan_that_cannot_run_in_full_starts_nothing(
        bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor", "executor")
    plan = plan_of(step("enable_cache", "note", mode="fire_and_forget"),
                   step("recycle_pool", "after", depends_on=["note"]),
                   step("rotate_logs", "fine"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        end = await ended(col, plan)
        await asyncio.sleep(0.5)
    got = {s.step_id: s for s in end.steps}
    assert got["after"].rule == "fire_and_forget"
    assert got["note"].rule == got["fine"].rule == "plan"
    assert end.outcome == "blocked" and actions.count() == 0
    assert not col.events(m.ExecutionApproved)


async def test_revoking_a_plan_cancels_its_running_steps_and_starts_no_new_wave(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s["rotate_logs"] = 20.0
    bus.write_config(config_toml(actions.url, approval_above="low"))
    await start_crew(bus, "governor", "executor")
    # Wave 1: one running step and one waiting for a human; wave 2 behind them.
    plan = plan_of(step("rotate_logs", "running"),
                   step("scale_pool", "asking", params={"size": 8}),
                   step("recycle_pool", "later", depends_on=["running"]))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        await approval_of(col, plan, "running")
        await col.wait_for(lambda e: isinstance(e, m.Decision) and e.plan_id == plan.plan_id
                           and e.outcome == "awaiting_approval")
        await actions.wait_calls(1)
        nc = await bus.connect(catalog.OPERATOR)
        await operator.publish(nc, m.ControlCommand(command="revoke", plan_id=plan.plan_id,
                                                    by="ana", reason="wrong diagnosis"))
        end = await ended(col, plan)
    got = {s.step_id: s for s in end.steps}
    assert got["running"].ended == "cancelled" and got["running"].released
    assert "revoked by ana: wrong diagnosis" in got["running"].detail
    assert got["asking"].ended == "revoked" and not got["asking"].released
    assert got["later"].ended in ("revoked", "skipped") and not got["later"].released
    assert [c.action for c in actions.calls] == ["rotate_logs"]
    assert end.outcome == "failed"
