"""The whole crew on the committed 3-node cluster: the node leading MENDERS_EVENTS is
SIGKILLed while an incident is between its plan and its verdict.

`menders up --nats-url` with all three nodes' URLs (each actor fails over between
them), streams and buckets at R3 (`menders provision --replicas 3`, which `up` must
keep). A webshop pool_exhaustion is injected; when the plan is on the bus the leader
dies. The incident must still end resolved, the subject healthy, its action carried
out once per approval, and no execution succeed twice; the time from the kill to the
resolution is printed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from actors.cli import demo
from actors.cli.eval import campaign, scenarios
from actors.cli.eval.records import Mark
from actors.runtime.config import load
from actors.stack.natsserver import free_port
from actors.stack.up import Stack
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.natsconf import password_env
from tests.test_cluster import Cluster, cluster, stop_node, stream_leader

__all__ = ["cluster"]  # the fixture, used by name

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

KIND = "webshop"


async def stored_events(c: Cluster, node_url: str) -> list[m.Event]:
    """MENDERS_EVENTS read back by sequence through a surviving node: the record of what
    happened, including what a live subscription missed during the failover."""
    import nats
    import nats.js.errors

    nc = await nats.connect(node_url, user=catalog.ADMIN, password=c.passwords[catalog.ADMIN])
    try:
        jsm = nc.jsm()
        deadline = time.monotonic() + 30
        while True:  # the stream answers again once its new leader is elected
            try:
                info = await jsm.stream_info(catalog.EVENTS_STREAM)
                break
            except (nats.errors.TimeoutError, nats.js.errors.APIError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        events = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(Exception):
                raw = await jsm.get_msg(catalog.EVENTS_STREAM, seq)
                events.append(codec.decode(raw.data or b""))
        return events
    finally:
        await nc.close()


async def until(what: str, check: Any, within: float) -> Any:
    deadline = time.monotonic() + within
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:g}s")
        await asyncio.sleep(0.05)


async def test_crew_on_a_cluster_ends_an_incident_when_the_events_leader_dies_mid_incident(
        cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    path = home / "menders.toml"
    path.write_text(demo.subjects_body(home, demo.ports_for((demo.SUBJECTS[KIND],)),
                                       free_port(), demo.free_port_block(9464,
                                                                         len(catalog.ACTORS))))
    for user, password in cluster.passwords.items():
        monkeypatch.setenv(password_env(user), password)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)  # the runbook diagnoses
    urls = ",".join(n.url for n in cluster.nodes)
    stack = Stack(load(path), str(path), nats_url=urls, child_logs=True)
    await stack.start()
    assert stack.supervisor is not None
    watch = asyncio.ensure_future(stack.supervisor.watch())
    try:
        await stack.wait_ready(90)
        async with campaign._connected(KIND, scenarios.BUILTIN_VARIANTS["runbook"],
                                       stack) as env:
            # `up` provisioned again and kept the cluster's R3 (it used to set R1).
            leader_name = await stream_leader(env.nc.jetstream(timeout=5), cluster)
            leader = cluster.node(leader_name)
            survivor = next(n for n in cluster.nodes if n is not leader)
            ok, why = await env.wait_healthy(60)
            assert ok, why
            _, _, effects0 = await env.oracle.read()

            t0 = time.time()
            await env.step(Mark(0.0, "inject", "pool_exhaustion"))
            plan = await until("a plan for the incident", lambda: next(
                (e for e in env.tl.since(t0, KIND) if isinstance(e, m.Plan)), None), 40)
            stop_node(leader, signal.SIGKILL)  # between plan and verdict: no goodbye
            killed_at = time.time()
            verdict_seen = [e for e in env.tl.since(t0, KIND) if isinstance(e, m.Verdict)]

            async def resolved() -> list[m.Event]:
                events = await stored_events(cluster, survivor.url)
                return [e for e in events if isinstance(e, m.IncidentResolved)
                        and e.incident_id == plan.incident_id]

            deadline = time.monotonic() + 60
            while not await resolved():
                assert time.monotonic() < deadline, (
                    "the incident did not end after the leader died\n" + cluster.logs())
                await asyncio.sleep(0.5)
            recovered_s = time.time() - killed_at
            _, _, effects1 = await env.oracle.read()
            await env.reset()  # the fault's injection ends (the crew cured its harm)
            ok, why = await env.wait_healthy(30)
            assert ok, why

        events = [e for e in await stored_events(cluster, survivor.url) if e.ts >= t0]
    finally:
        await stack.stop()
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watch

    mine = [e for e in events if e.subject == KIND]
    assert sum(isinstance(e, m.IncidentResolved) and e.incident_id == plan.incident_id
               for e in mine) == 1
    # The leader died before the verdict (else this test proved nothing about the window).
    assert not verdict_seen or verdict_seen[0].ts >= killed_at - 0.001, verdict_seen
    effects = {a: n - effects0.get(a, 0) for a, n in effects1.items()}
    approved = collections.Counter(e.step.action for e in mine
                                   if isinstance(e, m.ExecutionApproved))
    assert effects.get("recycle_pool", 0) >= 1, (effects, approved)
    assert all(n <= approved.get(a, 0) for a, n in effects.items()), (effects, approved)
    succeeded = collections.Counter(e.execution_id for e in mine
                                    if isinstance(e, m.ExecutionResult)
                                    and e.status == "succeeded")
    assert all(n == 1 for n in succeeded.values()), succeeded
    hops = ", ".join(f"{type(e).__name__} {e.ts - killed_at:+.2f}s" for e in mine
                     if e.ts >= plan.ts and not isinstance(e, m.Observation))
    print(f"\nafter the kill: {hops}")
    print(f"\nevents leader {leader_name} killed {killed_at - plan.ts:.3f}s after the plan; "
          f"incident resolved {recovered_s:.2f}s after the kill")
