"""The executor against a real nats-server, real actor processes and a recording
HTTP action server that answers like the webshop's action endpoints."""

from __future__ import annotations

import asyncio
import itertools
import re
import time

import aiohttp
import msgspec
import pytest

from actors.cli import operator
from actors.executor.ledger import Ledger, LedgerConflict, LedgerEntry
from actors.runtime.kv import Records
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.governor import MODE_KEY
from bus_schemas.verifier import IncidentRecord, incident_key
from tests.harness import (
    Bus,
    Collector,
    RecordingServer,
    approval_of,
    config_toml,
    plan_of,
    result_of,
    start_crew,
    step,
)


def results(col: Collector, plan: m.Plan) -> list[m.ExecutionResult]:
    return [e for e in col.events(m.ExecutionResult) if e.plan_id == plan.plan_id]


async def scrape(bus: Bus, actor: str) -> str:
    beat = await bus.wait_heartbeat(actor)
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{beat.metrics_port}/metrics") as r:
        return await r.text()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- tests -----------------------------------------------------------------------------


async def test_kill_mid_execution_cancels_it_and_nothing_runs_after(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s["rotate_logs"] = 30.0
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor", "executor")
    plan = plan_of(step("rotate_logs", "a"), step("enable_cache", "b", depends_on=["a"]))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        approved = await approval_of(col, plan, "a")
        await asyncio.wait_for(actions.entered.wait(), 15)
        nc = await bus.connect(catalog.OPERATOR)
        await operator.engage_kill(nc, "tester", "stop everything")
        res = await result_of(col, approved.execution_id)
        assert res.status == "cancelled" and res.rule == "kill"
        assert "kill switch engaged by tester: stop everything" in res.detail
        await col.wait_for(lambda e: isinstance(e, m.Decision) and e.outcome == "killed"
                           and e.execution_id == approved.execution_id)
        # The dependent step is skipped, and a new plan is vetoed by the kill switch.
        dep = await col.wait_for(lambda e: isinstance(e, m.Decision) and e.outcome == "skipped"
                                 and e.plan_id == plan.plan_id)
        assert "dependency 'a' did not succeed" in dep[0].reason
        later = plan_of(step("recycle_pool"))
        await bus.publish("planner", later)
        veto = await col.wait_for(lambda e: isinstance(e, m.Decision)
                                  and e.plan_id == later.plan_id)
        assert veto[0].outcome == "vetoed" and veto[0].reason == "kill switch engaged"
        assert not [e for e in col.events(m.ExecutionApproved) if e.plan_id == later.plan_id]
    assert [c.action for c in actions.calls] == ["rotate_logs"]
    text = await scrape(bus, "executor")
    assert metric(text, "menders_kill_propagation_seconds_count") == 1
    assert metric(text, "menders_executions_total", action="rotate_logs",
                  status="cancelled") == 1
    latency = metric(text, "menders_kill_propagation_seconds_sum")
    print(f"kill propagation (flag written -> action cancelled): {latency * 1000:.1f} ms")


async def test_queued_approval_is_skipped_after_a_kill(bus: Bus, actions: RecordingServer
                                                       ) -> None:
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor")
    plan = plan_of(step("recycle_pool"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        approved = await approval_of(col, plan)
        nc = await bus.connect(catalog.OPERATOR)
        await operator.engage_kill(nc, "tester", "hold")
        await start_crew(bus, "executor")  # the approval waited in the stream
        res = await result_of(col, approved.execution_id)
    assert res.status == "skipped" and "kill switch engaged by tester" in res.detail
    assert res.rule == "kill"
    assert actions.count() == 0


async def test_expired_approval_is_refused(bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url, approval_ttl_s=0.5))
    await start_crew(bus, "governor")
    plan = plan_of(step("recycle_pool"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        approved = await approval_of(col, plan)
        await asyncio.sleep(max(0.0, approved.not_after - time.time()) + 0.2)
        await start_crew(bus, "executor")
        res = await result_of(col, approved.execution_id)
    assert res.status == "skipped" and "approval expired" in res.detail
    assert res.rule == "approval_expired"
    assert actions.count() == 0


async def test_revoking_one_running_execution_cancels_it_and_spares_the_other(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s.update(rotate_logs=30.0, enable_cache=1.0)
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor", "executor")
    plan = plan_of(step("rotate_logs", "a"), step("enable_cache", "b"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        a = await approval_of(col, plan, "a")
        b = await approval_of(col, plan, "b")
        await actions.wait_calls(2)
        await bus.publish(catalog.OPERATOR, m.ControlCommand(
            command="revoke", execution_id=a.execution_id, by="tester", reason="wrong fix"))
        ra = await result_of(col, a.execution_id)
        rb = await result_of(col, b.execution_id)
        d = await col.wait_for(lambda e: isinstance(e, m.Decision) and e.outcome == "revoked")
    assert ra.status == "cancelled" and "revoked by tester: wrong fix" in ra.detail
    assert ra.rule == "revoked" and rb.rule == ""
    assert rb.status == "succeeded"
    assert d[0].execution_id == a.execution_id and d[0].reason == "revoked by tester: wrong fix"
    assert actions.count() == 2


async def test_sigkill_mid_non_idempotent_step_reports_unknown_and_never_repeats(
        bus: Bus, actions: RecordingServer) -> None:
    actions.block_s["restart_worker"] = 60.0
    bus.write_config(config_toml(actions.url))
    bus.spawn("governor")
    executor = bus.spawn("executor")
    await asyncio.gather(bus.wait_heartbeat("governor"), bus.wait_heartbeat("executor"))
    plan = plan_of(step("restart_worker"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        approved = await approval_of(col, plan)
        assert approved.step.idempotent is False  # the registry's word
        await asyncio.wait_for(actions.entered.wait(), 15)
        await col.wait_for(lambda e: isinstance(e, m.ExecutionStarted))
        executor.kill()  # SIGKILL in the middle of the effect
        await start_crew(bus, "executor")
        # The approval comes back once its ack wait (30 s) runs out.
        res = await result_of(col, approved.execution_id, within=45)
    assert res.status == "unknown"
    assert "lost mid-execution" in res.detail and "not repeated" in res.detail
    assert actions.count("restart_worker") == 1


async def test_duplicate_approval_with_recorded_outcome_has_no_second_effect(
        bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor", "executor")
    plan = plan_of(step("restart_worker"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        approved = await approval_of(col, plan)
        first = await result_of(col, approved.execution_id)
        assert first.status == "succeeded"
        # The very same approval delivered again (a new message id defeats publish dedup,
        # as a redelivery after the dedup window would).
        nc = await bus.connect("governor")
        await nc.jetstream().publish(catalog.bus_subject_of(approved), codec.encode(approved),
                                     headers={"Nats-Msg-Id": m.new_id()})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = await scrape(bus, "executor")
            if metric(text, "menders_execution_results_replayed_total") >= 1:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the duplicate approval was not answered from the ledger")
    again = [r for r in results(col, plan) if r.execution_id == approved.execution_id]
    assert {r.id for r in again} == {first.id} and {r.status for r in again} == {"succeeded"}
    assert actions.count("restart_worker") == 1


async def test_failed_action_fails_and_blocks_dependents(bus: Bus, actions: RecordingServer
                                                         ) -> None:
    actions.fail.add("failover_dependency")
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor", "executor")
    plan = plan_of(step("failover_dependency", "a"), step("enable_cache", "b", depends_on=["a"]))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        a = await approval_of(col, plan, "a")
        res = await result_of(col, a.execution_id)
        veto = await col.wait_for(lambda e: isinstance(e, m.Decision) and e.plan_id == plan.plan_id)
    assert res.status == "failed" and "broke" in res.detail
    assert re.search(r"dependency 'a' did not succeed \(failed\)", veto[0].reason)
    assert [c.action for c in actions.calls] == ["failover_dependency"]


async def test_ledger_claims_once_and_guards_the_outcome(bus: Bus) -> None:
    nc = await bus.connect("executor")
    ledger = Ledger(await nc.jetstream().key_value(catalog.EXEC_LEDGER_BUCKET))
    entry = LedgerEntry(execution_id="e1", plan_id="p", subject="shop", action="restart_worker",
                        idempotent=False, owner="me", claimed_at=1.0)
    first = await ledger.claim(entry)
    assert first is not None
    rival = LedgerEntry(execution_id="e1", plan_id="p", subject="shop", action="restart_worker",
                        idempotent=False, owner="rival", claimed_at=2.0)
    assert await ledger.claim(rival) is None  # create() fails: the key exists
    result = m.ExecutionResult(execution_id="e1", plan_id="p", action="restart_worker",
                               status="succeeded", subject="shop")
    done = await ledger.finish(first, result)
    assert (await ledger.read("e1")) == done and done.entry.result == result
    with pytest.raises(LedgerConflict):  # a stale revision cannot overwrite the outcome
        await ledger.finish(first, msgspec.structs.replace(result, status="failed"))


async def test_an_approval_issued_under_execute_does_not_run_after_mode_approve(
        bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor")
    plan = plan_of(step("recycle_pool"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        approved = await approval_of(col, plan)
        assert approved.approved_by == "policy"
        await bus.publish(catalog.OPERATOR, m.ControlCommand(command="mode", mode="approve",
                                                             by="tester"))
        nc = await bus.connect(catalog.OPERATOR)
        assert await operator.wait_for(nc, MODE_KEY, lambda v: v == b"approve", 10)
        await start_crew(bus, "executor")  # the approval waited in the stream
        res = await result_of(col, approved.execution_id)
    assert res.status == "skipped" and "the mode is now approve" in res.detail
    assert res.rule == "mode"
    assert actions.count() == 0


async def test_every_approval_expires_within_the_bound(bus: Bus, actions: RecordingServer
                                                       ) -> None:
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor", "executor")
    now = time.time()
    forever = m.ExecutionApproved(
        incident_id=m.new_id(), subject="shop", execution_id=m.new_id(), plan_id=m.new_id(),
        step=step("recycle_pool"), ts=now, not_after=now + m.MAX_APPROVAL_TTL_S + 60)
    # No not_after at all: not an approval (the schema requires it), dead-lettered.
    unbounded = codec.encode(msgspec.structs.replace(forever, id=m.new_id(),
                                                     execution_id=m.new_id()))
    unbounded = unbounded.replace(f',"not_after":{forever.not_after!r}'.encode(), b"")
    assert b"not_after" not in unbounded
    async with bus.collect() as col:
        await bus.publish("governor", forever)
        res = await result_of(col, forever.execution_id)
        nc = await bus.connect("governor")
        await nc.jetstream().publish(catalog.bus_subject_of(forever), unbounded)
        letter = await col.wait_for(lambda e: isinstance(e, m.DeadLetter)
                                    and e.consumer == "executor")
    assert res.status == "skipped" and "more than the 3600s any approval may be" in res.detail
    assert res.rule == "approval_expired"
    assert "not_after" in letter[0].reason
    assert actions.count() == 0


async def test_a_step_for_an_incident_already_resolved_is_not_run(
        bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor")
    plan = plan_of(step("recycle_pool"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        approved = await approval_of(col, plan)
        # Meanwhile the detector resolved the incident, and the verifier recorded it.
        nc = await bus.connect("verifier")
        incidents = Records(await nc.jetstream().key_value(catalog.VERIFIER_BUCKET),
                            IncidentRecord)
        await incidents.put(incident_key(plan.incident_id), IncidentRecord(
            subject="shop", invariant="p99", opened_at=time.time() - 30,
            resolved_at=time.time() - 1))
        await start_crew(bus, "executor")
        res = await result_of(col, approved.execution_id)
    assert res.status == "skipped" and "was resolved by the detector" in res.detail
    assert res.rule == "resolved"
    assert actions.count() == 0


async def test_a_failing_idempotent_action_is_retried_as_its_policy_says_then_fails(
        bus: Bus, actions: RecordingServer) -> None:
    """enable_cache declares RetryPolicy(attempts=3): three calls, one result, and the
    plan's step says how many tries it took. A non-retrying action is called once."""
    actions.fail |= {"enable_cache", "recycle_pool"}
    bus.write_config(config_toml(actions.url))
    await start_crew(bus, "governor", "executor")
    plan = plan_of(step("enable_cache", "a"), step("recycle_pool", "b"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        a = await approval_of(col, plan, "a")
        b = await approval_of(col, plan, "b")
        ra = await result_of(col, a.execution_id)
        rb = await result_of(col, b.execution_id)
    assert a.step.attempts == 3 and a.step.budget_s > 3 * a.step.timeout_s
    assert (ra.status, ra.tries) == ("failed", 3) and "(after 3 tries)" in ra.detail
    assert (rb.status, rb.tries) == ("failed", 1)
    calls = [c for c in actions.calls if c.action == "enable_cache"]
    assert len(calls) == 3 and actions.count("recycle_pool") == 1
    # The pauses between tries follow the backoff (0.2 s, then 0.4 s).
    gaps = [y.at - x.at for x, y in itertools.pairwise(calls)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps
