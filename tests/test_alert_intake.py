"""Alertmanager as an incident source, on a real bus with real actor processes: the
monitor's webhook receiver (token, bad bodies, routing, fingerprint identity, counts),
and an incident only an alert opened, judged by the alert resolving."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.stack.natsserver import free_port
from bus_schemas import catalog
from bus_schemas import messages as m
from tests.harness import SHOP, SHOP_CONFIG, Bus, Feed, webshop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]
TOKEN_ENV = "MENDERS_TEST_AM_TOKEN"


def payload(status: str, fp: str, **labels: str) -> dict[str, Any]:
    return {"version": "4", "status": status, "receiver": "menders", "alerts": [{
        "status": status, "labels": labels, "annotations": {"summary": "upstream is down"},
        "fingerprint": fp, "startsAt": "2026-12-03T12:00:00Z"}]}


async def counts(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        text = await resp.text()
    return {sample.labels["outcome"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "menders_monitor_alerts_total"}


async def test_the_receiver_checks_counts_routes_and_folds_alerts_into_observations(
        bus: Bus) -> None:
    listen, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    bus.write_config(SHOP_CONFIG + f"""
[runtime]
heartbeat_s = 0.5

[alertmanager]
listen = "{listen}"
token_env = "{TOKEN_ENV}"
routes = [{{ subject = "{SHOP}", match = {{ team = "shop" }} }}]
""")
    bus.spawn("monitor", MENDERS_METRICS_PORT=str(metrics_port), **{TOKEN_ENV: "s3cret"})
    await bus.wait_heartbeat("monitor")
    url = f"http://{listen}/alertmanager"
    auth = {"Authorization": "Bearer s3cret"}

    async def post(body: Any, headers: dict[str, str] = auth) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with aiohttp.ClientSession() as s, s.post(url, data=data,
                                                        headers=headers) as resp:
            return resp.status, await resp.json()

    async with bus.collect(catalog.under("obs")) as col:
        firing = payload("firing", "f1", alertname="UpstreamDown", team="shop")
        assert (await post(firing, {}))[0] == 401
        assert (await post(firing, {"Authorization": "Bearer wrong"}))[0] == 401
        status, reply = await post(b"{not json")
        assert status == 400 and "not an Alertmanager v4 payload" in reply["error"]
        assert await post(payload("firing", "f2", alertname="Other", team="db")) == (
            200, {"ok": True, "unrouted": 1})
        assert await post(firing) == (200, {"ok": True, "firing": 1})
        assert await post(firing) == (200, {"ok": True, "repeated": 1})  # same fingerprint
        seen = await col.wait_for(lambda e: isinstance(e, m.Observation)
                                  and e.metrics.get("alert:UpstreamDown") == 1)
        assert "alert:Other" not in seen[0].metrics
        noted = await col.wait_for(lambda e: isinstance(e, m.Observation) and any(
            '"alert":"UpstreamDown"' in line for line in e.log_lines))
        assert len([e for e in col.events(m.Observation) if any(
            '"alert":"UpstreamDown"' in line for line in e.log_lines)]) == 1, noted
        assert await post(payload("resolved", "f1", alertname="UpstreamDown",
                                  team="shop")) == (200, {"ok": True, "resolved": 1})
        await col.wait_for(lambda e: isinstance(e, m.Observation)
                           and e.metrics.get("alert:UpstreamDown") == 0)
    assert await counts(f"http://127.0.0.1:{metrics_port}/metrics") == {
        "unauthorized": 2, "bad_payload": 1, "unrouted": 1, "firing": 1, "repeated": 1,
        "resolved": 1}


async def finish(bus: Bus, incident_id: str) -> m.PlanEnded:
    now = time.time()
    ending = m.StepEnding(step_id="s1", action="failover_dependency", ended="succeeded",
                          released=True)
    ended = m.PlanEnded(incident_id=incident_id, subject=SHOP, plan_id=m.new_id(),
                        outcome="succeeded", steps=[ending], started_at=now - 1,
                        finished_at=now)
    await bus.publish("governor", ended)
    return ended


@pytest.mark.parametrize("resolves", [True, False])
async def test_an_alert_only_incident_passes_when_it_resolves_and_is_inconclusive_if_not(
        bus: Bus, resolves: bool) -> None:
    bus.write_config(SHOP_CONFIG.replace("deadline_s = 6.0", "deadline_s = 6.0\n"
                                         "alert_deadline_s = 4.0"))
    for actor in ("detector", "verifier"):
        bus.spawn(actor)
    await asyncio.gather(bus.wait_heartbeat("detector"), bus.wait_heartbeat("verifier"))
    defn = await webshop()
    feed = Feed(await bus.connect("monitor"), defn, step=0.5)
    await feed.many(3)
    async with bus.collect() as col:
        await feed.send({"alert:UpstreamDown": 1})
        [opened] = await col.wait_for(lambda e: isinstance(e, m.IncidentOpened))
        assert opened.invariant == "alert:UpstreamDown"  # no declared invariant claims it
        assert "Alertmanager reports UpstreamDown firing" in opened.summary
        await finish(bus, opened.incident_id)
        deadline = time.monotonic() + 30
        while not col.events(m.Verdict) and time.monotonic() < deadline:
            await feed.send({"alert:UpstreamDown": 0 if resolves else 1})
            await asyncio.sleep(0.5)
        [verdict] = col.events(m.Verdict)
    if resolves:
        assert verdict.passed and not verdict.inconclusive, verdict.reason
        assert any(isinstance(e, m.IncidentResolved) and e.incident_id == opened.incident_id
                   for e in col.events())
    else:  # never a silent pass, and no word from Alertmanager is not a failed fix
        assert not verdict.passed and verdict.inconclusive, verdict.reason
        assert "the alert behind alert:UpstreamDown did not resolve" in verdict.reason
