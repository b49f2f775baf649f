"""The kill switch: engaging never needs the governor, releasing is the governor's alone.

A release that no `menders resume` made (the operator's own put of a released
flag, or `kv del kill`) is undone by the governor and reported (KillReengaged),
and the three readers (the governor's metric, `menders status`, and the
executor's pre-start read, `read_kill`) agree in every case.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from actors.runtime.killswitch import read_kill
from actors.runtime.kv import Bucket
from bus_schemas import catalog
from bus_schemas import messages as m
from bus_schemas.governor import KILL_KEY, KillFlag, encode_kill, parse_kill
from bus_schemas.natsconf import password_env
from tests.harness import REPO, Bus, RecordingServer, config_toml


async def governor_bucket(bus: Bus) -> Bucket:
    nc = await bus.connect(catalog.OPERATOR)
    return Bucket(await nc.jetstream().key_value(catalog.GOVERNOR_BUCKET))


def metric(port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    for fam in text_string_to_metric_families(body.decode()):
        if fam.name == "menders_governor_kill_engaged":
            return float(fam.samples[0].value)
    raise AssertionError("no menders_governor_kill_engaged metric")


def menders(bus: Bus, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDERS_")}
    env.update(MENDERS_HOME=str(bus.home), MENDERS_NATS_URL=bus.url,
               **{password_env(catalog.OPERATOR): bus.passwords[catalog.OPERATOR]})
    return subprocess.run([sys.executable, "-m", "actors", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=30)


async def start_governor(bus: Bus, actions: RecordingServer) -> int:
    bus.write_config(config_toml(actions.url))
    bus.spawn("governor")
    return (await bus.wait_heartbeat("governor")).metrics_port


async def test_a_release_no_resume_made_is_undone_by_the_governor_and_reported(
        bus: Bus, actions: RecordingServer) -> None:
    await start_governor(bus, actions)
    gkv = await governor_bucket(bus)
    async with bus.collect() as col:
        # The operator's KV right lets it write the kill key: a forged release ...
        await gkv.put(KILL_KEY, encode_kill(KillFlag(engaged=False, by="mallory")))
        [first] = await col.wait_for(lambda e: isinstance(e, m.KillReengaged))
        # ... and a deleted key.
        await gkv.delete(KILL_KEY)
        await col.wait_for(lambda e: isinstance(e, m.KillReengaged), count=2)
        second = col.events(m.KillReengaged)[1]
    assert first.producer == "governor" and first.found_by == "mallory"
    assert "without `menders resume`" in first.reason and first.found_revision > 0
    assert "deleted" in second.reason and second.found_revision == 0
    raw = await gkv.get_bytes(KILL_KEY)
    flag = parse_kill(raw)
    assert raw is not None and flag.engaged and flag.by == "governor"
    assert (await read_kill(gkv)).engaged


async def test_the_metric_status_and_executors_agree_on_the_kill_switch_in_every_case(
        bus: Bus, actions: RecordingServer) -> None:
    port = await start_governor(bus, actions)
    gkv = await governor_bucket(bus)

    async def agree(engaged: bool, case: str) -> None:
        deadline = time.monotonic() + 15
        while (await asyncio.to_thread(metric, port)) != float(engaged):
            assert time.monotonic() < deadline, f"{case}: the metric never read {engaged}"
            await asyncio.sleep(0.05)
        st = await asyncio.to_thread(menders, bus, "status", "--json")
        assert json.loads(st.stdout)["kill"]["engaged"] is engaged, (case, st.stdout)
        # What every executor reads before it starts anything.
        assert (await read_kill(gkv)).engaged is engaged, case
        assert await asyncio.to_thread(metric, port) == float(engaged), case

    async def resume() -> None:
        out = await asyncio.to_thread(menders, bus, "resume", "--by", "ana")
        assert out.returncode == 0 and "released" in out.stdout, out.stderr

    await agree(False, "provisioned release")
    await gkv.put(KILL_KEY, encode_kill(KillFlag(engaged=True, by="ana", at=time.time())))
    await agree(True, "engaged by the operator")
    await resume()
    await agree(False, "the governor's release")
    await gkv.put(KILL_KEY, b"\x00not json")
    await agree(True, "unreadable")
    await resume()
    await agree(False, "released again")
    await gkv.put(KILL_KEY, encode_kill(KillFlag(engaged=False, by="mallory")))
    await agree(True, "forged release")
    await resume()
    await gkv.delete(KILL_KEY)
    await agree(True, "missing")


async def test_a_kill_command_over_an_unreadable_flag_writes_a_readable_engaged_one(
        bus: Bus, actions: RecordingServer) -> None:
    await start_governor(bus, actions)
    gkv = await governor_bucket(bus)
    await gkv.put(KILL_KEY, b"garbage")
    await bus.publish(catalog.OPERATOR, m.ControlCommand(command="kill", by="ana",
                                                         reason="drill"))
    deadline = time.monotonic() + 15
    while (raw := await gkv.get_bytes(KILL_KEY)) == b"garbage":
        assert time.monotonic() < deadline, "the unreadable flag was kept"
        await asyncio.sleep(0.05)
    assert raw is not None
    flag = parse_kill(raw)
    assert flag.engaged and flag.by == "ana" and flag.reason == "drill"


async def test_engaging_needs_no_governor(bus: Bus) -> None:
    out = await asyncio.to_thread(menders, bus, "kill", "--by", "ana", "--reason", "drill")
    assert out.returncode == 0, out.stderr
    gkv = await governor_bucket(bus)
    flag = await read_kill(gkv)
    assert flag.engaged and flag.by == "ana"
