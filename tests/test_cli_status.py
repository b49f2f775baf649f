"""`menders status` as an operator meets it on a bus that holds bad and unfinished things."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from actors.planner.attempts import IncidentState, state_key
from actors.runtime.kv import Records
from bus_schemas import catalog
from bus_schemas import messages as m
from bus_schemas.natsconf import password_env
from tests.harness import (
    REPO,
    Bus,
    RecordingServer,
    config_toml,
    plan_of,
    start_crew,
    step,
)

pytestmark = pytest.mark.e2e  # every test runs `menders` as a process


def env_of(bus: Bus) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDERS_")}
    env.update(MENDERS_NATS_URL=bus.url, MENDERS_HOME=str(bus.home))
    env[password_env(catalog.OPERATOR)] = bus.passwords[catalog.OPERATOR]
    return env


def status(bus: Bus, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "actors", "status", *args], env=env_of(bus),
                          cwd=REPO, capture_output=True, text=True, timeout=30)


def opened(incident_id: str) -> m.IncidentOpened:
    return m.IncidentOpened(incident_id=incident_id, subject="webshop", invariant="p99_latency",
                            summary="p99 950 ms > 250 ms", value=950, threshold=250)


async def test_status_survives_an_undecodable_incident_event_and_shows_escalated_ones(
        bus: Bus) -> None:
    await bus.publish("detector", opened("aaaa1111"))
    await bus.publish("detector", opened("bbbb2222"))
    # Any actor that may publish incidents can put garbage there; it is kept 30 days.
    where = catalog.subject_for(m.IncidentOpened, subject="webshop")
    seq = await bus.publish_raw(where, b'{"kind": "incident.opened", "incident_id": 7',
                                user="detector")
    await bus.publish("planner", m.IncidentEscalated(incident_id="bbbb2222", subject="webshop",
                                                     invariant="p99_latency",
                                                     reason="out of ideas"))
    await bus.publish("detector", opened("cccc3333"))
    await bus.publish("detector", m.IncidentResolved(incident_id="cccc3333", subject="webshop",
                                                     invariant="p99_latency", reason="holds"))
    out = status(bus, "--json")
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 1  # no actor runs, and status says so
    st = json.loads(out.stdout)
    states = {i["incident_id"]: i["state"] for i in st["open_incidents"]}
    assert states == {"aaaa1111": "open", "bbbb2222": "escalated"}
    [bad] = st["bad_events"]
    assert f"seq {seq} on {where}" in bad
    text = status(bus)
    assert "Traceback" not in text.stderr, text.stderr
    assert "open incidents: 2 (1 escalated to a human, still broken)" in text.stdout
    assert "bbbb2222 webshop p99_latency: ESCALATED, still broken" in text.stdout
    assert "undecodable incident events: 1 (skipped)" in text.stdout


def test_status_into_a_closed_pipe_exits_quietly(bus: Bus) -> None:
    # `menders status | head -0`: the reader is gone before anything is written.
    proc = subprocess.Popen([sys.executable, "-m", "actors", "status"], env=env_of(bus),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 0, err
    assert err == "", err


async def test_status_lists_the_steps_waiting_for_a_human_with_their_deadlines(
        bus: Bus, actions: RecordingServer) -> None:
    bus.write_config(config_toml(actions.url, mode="approve", approval_timeout_s=300.0))
    await start_crew(bus, "governor")
    plan = plan_of(step("recycle_pool"))
    async with bus.collect() as col:
        await bus.publish("planner", plan)
        [waiting] = await col.wait_for(lambda e: isinstance(e, m.Decision)
                                       and e.outcome == "awaiting_approval")
    out = status(bus, "--json")
    [p] = json.loads(out.stdout)["pending_approvals"]
    assert p["execution_id"] == waiting.execution_id
    assert (p["subject"], p["action"], p["incident_id"]) == ("shop", "recycle_pool",
                                                            plan.incident_id)
    assert 0 < p["expires_at"] - time.time() <= 300
    text = status(bus).stdout
    assert "waiting for a human: 1 (menders approve|deny <execution id>)" in text
    assert f"{waiting.execution_id}  shop recycle_pool for incident {plan.incident_id[:8]}" in text
    assert "approve mode: a human must approve" in text
    assert actions.count() == 0


async def test_status_shows_what_the_planner_is_doing_parked_and_recurring(bus: Bus) -> None:
    await bus.publish("detector", opened("dddd4444"))
    await bus.publish("detector", opened("eeee5555"))
    await bus.publish("planner", m.IncidentRecurring(
        incident_id="eeee5555", subject="webshop", invariant="p99_latency", count=3,
        window_s=600.0, incidents=["dddd4444", "eeee5555"]))
    # The planner's own record is the authority on what it is doing now.
    nc = await bus.connect("planner")
    states = Records(await nc.jetstream().key_value(catalog.PLANNER_BUCKET), IncidentState)
    await states.put(state_key("dddd4444"), IncidentState(
        incident_id="dddd4444", subject="webshop", invariant="p99_latency", parked="kill",
        park_reason="kill switch engaged", retry_at=time.time() + 30))
    await states.put(state_key("eeee5555"), IncidentState(
        incident_id="eeee5555", subject="webshop", invariant="p99_latency", attempt=2,
        plan_id="p2", action="recycle_pool"))
    st = json.loads(status(bus, "--json").stdout)
    by_id = {i["incident_id"]: i for i in st["open_incidents"]}
    assert by_id["dddd4444"]["state"] == "parked"
    assert by_id["dddd4444"]["planner"]["obstacle"] == "kill"
    assert by_id["eeee5555"]["planner"] == {"attempt": 2, "action": "recycle_pool",
                                            "state": "working"}
    assert by_id["eeee5555"]["recurring"] == 3 and by_id["dddd4444"]["recurring"] == 3
    text = status(bus).stdout
    assert "dddd4444 webshop p99_latency: RECURRING x3, PARKED (kill: kill switch engaged" in text
    assert "eeee5555 webshop p99_latency: RECURRING x3, working attempt 2 recycle_pool:" in text
