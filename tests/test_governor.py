"""The governor against a real nats-server and real actor processes."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from bus_schemas import catalog, codec
from bus_schemas import messages as m
from tests.harness import (
    ActorProc,
    Bus,
    Collector,
    RecordingServer,
    approval_of,
    config_toml,
    plan_of,
    result_of,
    spawn_stopping_governor,
    start_crew,
    step,
    wait_stopped,
)


def decisions(col: Collector, plan: m.Plan) -> dict[str, m.Decision]:
    assert plan.steps
    by_eid = {d.execution_id: d for d in col.events(m.Decision) if d.plan_id == plan.plan_id}
    return {d.step.step_id: d for d in by_eid.values() if d.step is not None}


async def wait_decisions(col: Collector, plan: m.Plan, n: int) -> dict[str, m.Decision]:
    await col.wait_for(lambda e: isinstance(e, m.Decision) and e.plan_id == plan.plan_id,
                       count=n)
    return decisions(col, plan)


async def test_vetoes_name_their_reason(bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url,
                                 allow={"shop": ["recycle_pool", "scale_pool"]}))
    await start_crew(bus, "governor")
    plan = plan_of(step("drop_database", "unregistered"),
                   step("scale_pool", "bad_params", params={"size": "lots"}),
                   step("enable_cache", "not_allowed"),
                   step("recycle_pool", "after_veto", depends_on=["unregistered"]),
                   step("recycle_pool", "cycle", depends_on=["cycle"]))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        got = await wait_decisions(col, plan, 5)
    assert {d.outcome for d in got.values()} == {"vetoed"}
    assert "'drop_database' is not registered for subject kind 'webshop'" in \
        got["unregistered"].reason
    assert "scale_pool: bad parameters" in got["bad_params"].reason
    assert "size" in got["bad_params"].reason
    assert "'enable_cache' is not in the allow-list of 'shop'" in got["not_allowed"].reason
    # The whole plan is judged before its first step: a plan that cannot run in full
    # does not start, and the steps that could have run say which step stopped them.
    assert got["after_veto"].rule == "plan"
    assert "the plan cannot run in full (step 'unregistered' was vetoed: registry)" in \
        got["after_veto"].reason
    assert got["cycle"].reason == "dependency cycle"
    assert not col.events(m.ExecutionApproved)
    assert actions.count() == 0


async def test_unknown_subject_is_vetoed(bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor")
    plan = plan_of(step("recycle_pool"), subject="elsewhere")
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        got = await wait_decisions(col, plan, 1)
    assert got["s1"].reason == "subject 'elsewhere' is not configured"


async def test_observe_mode_executes_nothing(bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url, mode="observe"))
    await start_crew(bus, "governor", "executor")
    plan = plan_of(step("recycle_pool"), step("enable_cache", "s2"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        got = await wait_decisions(col, plan, 2)
    assert {d.reason for d in got.values()} == {"observe mode: nothing executes"}
    assert not col.events(m.ExecutionApproved)
    assert actions.count() == 0


async def test_approve_mode_waits_and_one_human_approval_releases_exactly_one(
        bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url, mode="approve"))
    await start_crew(bus, "governor", "executor")
    plan = plan_of(step("recycle_pool"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        waiting = (await wait_decisions(col, plan, 1))["s1"]
        assert waiting.outcome == "awaiting_approval"
        assert f"menders approve {waiting.execution_id}" in waiting.reason
        await asyncio.sleep(1.0)  # nothing may happen without a human
        assert not col.events(m.ExecutionApproved) and actions.count() == 0
        approval = m.HumanApproval(execution_id=waiting.execution_id, approved=True, by="alice")
        await bus.publish(catalog.OPERATOR, approval)
        approved = await approval_of(col, plan)
        assert approved.approved_by == "alice"
        assert approved.execution_id == waiting.execution_id
        res = await result_of(col, approved.execution_id)
        assert res.status == "succeeded"
        # A second approval (a double click) releases nothing more.
        await bus.publish(catalog.OPERATOR, m.HumanApproval(
            execution_id=waiting.execution_id, approved=True, by="bob"))
        await asyncio.sleep(1.0)
    assert len([e for e in col.events(m.ExecutionApproved) if e.plan_id == plan.plan_id]) == 1
    assert actions.count() == 1


async def test_high_risk_waits_and_a_denial_ends_it(bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url, approval_above="low"))
    await start_crew(bus, "governor", "executor")
    plan = plan_of(step("scale_pool", params={"size": 8}), step("recycle_pool", "after",
                                                               depends_on=["s1"]))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        waiting = (await wait_decisions(col, plan, 1))["s1"]
        assert waiting.outcome == "awaiting_approval"
        assert "risk medium is above low" in waiting.reason
        await bus.publish(catalog.OPERATOR, m.HumanApproval(
            execution_id=waiting.execution_id, approved=False, by="carol", reason="not now"))
        got = await wait_decisions(col, plan, 3)
    assert got["s1"].outcome == "denied" and got["s1"].reason == "denied by carol: not now"
    assert got["after"].outcome == "skipped" and got["after"].rule == "dependency"
    assert not col.events(m.ExecutionApproved)
    assert actions.count() == 0


async def test_pending_approval_survives_a_governor_restart(bus: Bus,
                                                            actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url, mode="approve"))
    gov = bus.spawn("governor")
    await start_crew(bus, "executor")
    await bus.wait_heartbeat("governor")
    plan = plan_of(step("enable_cache"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        waiting = (await wait_decisions(col, plan, 1))["s1"]
        assert gov.terminate() == 0
        await start_crew(bus, "governor")
        await bus.publish(catalog.OPERATOR, m.HumanApproval(
            execution_id=waiting.execution_id, approved=True, by="dave"))
        res = await result_of(col, waiting.execution_id)
    assert res.status == "succeeded" and actions.count("enable_cache") == 1


async def test_approval_timeout_denies(bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url, mode="approve", approval_timeout_s=1.0))
    await start_crew(bus, "governor")
    plan = plan_of(step("enable_cache"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        await col.wait_for(lambda e: isinstance(e, m.Decision) and e.outcome == "denied")
    d = decisions(col, plan)["s1"]
    assert d.reason == "denied by the governor: no human decision within 1s"


async def died_at(bus: Bus, point: str) -> ActorProc:
    """A governor that stops itself at `point`; SIGKILL it once it is there."""
    gov = spawn_stopping_governor(bus, point)
    await bus.wait_heartbeat("governor")
    return gov


async def test_a_timeout_denial_committed_when_the_governor_dies_is_published_by_its_successor(
        bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url, mode="approve", approval_timeout_s=1.0))
    gov = await died_at(bus, "expiry_committed")
    plan = plan_of(step("enable_cache"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        await wait_decisions(col, plan, 1)
        await wait_stopped(gov)  # the denial is committed, not published
        gov.kill()
        assert not [d for d in col.events(m.Decision) if d.outcome == "denied"]
        await start_crew(bus, "governor")
        [denied] = await col.wait_for(lambda e: isinstance(e, m.Decision)
                                      and e.outcome == "denied")
    assert denied.plan_id == plan.plan_id and denied.ends_step
    assert "no human decision within 1s" in denied.reason


@pytest.mark.parametrize("point", ["settle_progress_saved", "approval_committed"])
async def test_an_approval_in_flight_when_the_governor_dies_is_released_once_by_its_successor(
        bus: Bus, actions: RecordingServer, point: str) -> None:
    """Dies after the plan's progress recorded the release (before or after the pending
    was marked settled): its successor publishes that approval, once."""
    bus.write_config(config_toml(actions.url, mode="approve"))
    gov = await died_at(bus, point)
    await start_crew(bus, "executor")
    plan = plan_of(step("enable_cache"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        waiting = (await wait_decisions(col, plan, 1))["s1"]
        await bus.publish(catalog.OPERATOR, m.HumanApproval(
            execution_id=waiting.execution_id, approved=True, by="alice"))
        await wait_stopped(gov)  # the release is committed, not published
        gov.kill()
        # Nothing was approved on the bus, so nothing ran.
        assert not col.events(m.ExecutionApproved) and actions.count() == 0
        await start_crew(bus, "governor")
        approved = await approval_of(col, plan)
        res = await result_of(col, approved.execution_id)
    assert approved.approved_by == "alice" and res.status == "succeeded"
    assert actions.count("enable_cache") == 1


async def test_an_expiry_committed_when_the_governor_dies_is_published_by_its_successor(
        bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url, approval_ttl_s=0.5, slot_grace_s=0.5))
    gov = await died_at(bus, "slot_expiry_committed")  # and no executor: nobody reports
    plan = plan_of(step("enable_cache"), step("recycle_pool", "after", depends_on=["s1"]))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        await approval_of(col, plan)
        await wait_stopped(gov, within=30)  # the step failed in KV, nothing published
        gov.kill()
        assert not [d for d in col.events(m.Decision) if d.outcome == "expired"]
        await start_crew(bus, "governor")
        got = await wait_decisions(col, plan, 2)
    assert got["s1"].outcome == "expired" and got["s1"].ends_step
    assert got["after"].outcome == "skipped" and "did not succeed (failed)" in got["after"].reason


async def test_a_plan_in_flight_when_the_governor_dies_is_judged_by_its_successor(
        bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url))
    gov = await died_at(bus, "plan_committed")
    await start_crew(bus, "executor")
    plan = plan_of(step("enable_cache"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        await wait_stopped(gov)  # judged and committed, nothing published
        gov.kill()
        assert not col.events(m.ExecutionApproved) and actions.count() == 0
        await start_crew(bus, "governor")
        approved = await approval_of(col, plan)
        res = await result_of(col, approved.execution_id)
    assert res.status == "succeeded" and actions.count("enable_cache") == 1


async def test_only_the_governor_may_publish_approvals(bus: Bus, actions: RecordingServer
                                                       ) -> None:
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "executor")
    forged = m.ExecutionApproved(execution_id=m.new_id(), plan_id="p", subject="shop",
                                 step=step("restart_worker"), not_after=2e9)
    async with bus.collect() as col:
        for user in ("planner", "executor", catalog.OPERATOR, "diagnoser"):
            errors: list[str] = []
            nc = await bus.connect(user, errors)
            try:
                await nc.jetstream(timeout=1).publish(catalog.bus_subject_of(forged),
                                                      codec.encode(forged))
                raise AssertionError(f"{user} published an approval")
            except nats.errors.TimeoutError:
                pass  # the server drops the message; the refusal comes through error_cb
            for _ in range(50):
                if errors:
                    break
                await asyncio.sleep(0.02)
            assert any("permissions violation" in e.lower()
                       and catalog.bus_subject_of(forged) in e for e in errors), (user, errors)
        await asyncio.sleep(1.0)
    assert not col.events(m.ExecutionResult)
    assert actions.count() == 0


async def test_rate_limit_and_cooldown_veto(bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url, max_per_subject_per_minute=2,
                                 action_cooldown_s=60))
    await start_crew(bus, "governor", "executor")
    plans = [plan_of(step("recycle_pool")), plan_of(step("recycle_pool")),
             plan_of(step("enable_cache")), plan_of(step("rotate_logs"))]
    async with bus.collect() as col:
        for p in plans:
            await bus.publish("planner", p)
        first = await approval_of(col, plans[0])
        cooldown = await wait_decisions(col, plans[1], 1)
        third = await approval_of(col, plans[2])
        rate = await wait_decisions(col, plans[3], 1)
        await result_of(col, first.execution_id)
        await result_of(col, third.execution_id)
    assert cooldown["s1"].reason.startswith("cooldown: 'recycle_pool' on 'shop' ran")
    assert rate["s1"].reason == ("rate limit: 2 executions on 'shop' in the last minute (max 2)")
    assert actions.count() == 2


async def test_dependent_step_runs_after_its_dependency_succeeds(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s["failover_dependency"] = 0.5
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor", "executor")
    plan = plan_of(step("enable_cache", "b", depends_on=["a"]), step("failover_dependency", "a"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        b = await approval_of(col, plan, "b")
        await result_of(col, b.execution_id)
        a = await approval_of(col, plan, "a")
    assert [c.action for c in actions.calls] == ["failover_dependency", "enable_cache"]
    assert b.causation_id != a.causation_id  # released by a's result, not by the plan
