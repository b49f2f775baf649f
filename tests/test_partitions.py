"""Scale-out by partition: observations stored by the server's own partition mapping,
leases that split the partitions between detector processes, and a SIGKILLed
detector's partitions passing to the survivor without losing an incident."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.cli.operator import partition_owners
from actors.runtime.kv import Bucket
from actors.runtime.metrics import ActorMetrics
from actors.runtime.partitions import Leases, assignment
from actors.stack.natsserver import free_port
from bench.scale import fleet_config
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.queries import ObservationsInput, ObsQuery, ObsReply
from tests.harness import (
    REPO,
    Bus,
    breaking_value,
    healthy_metrics,
    latency,
    stored,
    until,
    webshop,
)

pytestmark = pytest.mark.timeout(120)

ALL = list(range(catalog.OBS_PARTITIONS))


# --- the assignment (pure) ----------------------------------------------------------------


def test_the_assignment_is_balanced_total_and_the_same_from_any_order() -> None:
    for n in range(1, catalog.OBS_PARTITIONS + 3):
        members = [f"detector-{i}" for i in range(n)]
        got = assignment(members, ALL)
        assert sorted(got) == ALL  # every partition has exactly one owner
        loads = Counter(got.values())
        assert max(loads.values()) - min(loads.values()) <= 1
        assert len(loads) == min(n, len(ALL))  # nobody idle while partitions remain
        assert assignment(list(reversed(members)) + members[:1], ALL) == got
    assert assignment([], ALL) == {}


# --- the server's partition mapping ---------------------------------------------------------


async def test_partition_of_is_the_servers_own_mapping(bus: Bus) -> None:
    names = [f"svc-{i}" for i in range(150)] + ["webshop", "ratelimiter", "kv_cluster", "a-b_c"]
    js = (await bus.connect("monitor")).jetstream()
    for name in names:
        obs = m.Observation(subject=name, producer="monitor", ts=time.time(), up=True)
        await js.publish(catalog.bus_subject_of(obs), codec.encode(obs))
    ojs = (await bus.connect(catalog.OPERATOR)).jetstream()
    info = await ojs.stream_info(catalog.OBS_STREAM)
    stored: dict[str, str] = {}
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await ojs.get_msg(catalog.OBS_STREAM, seq)
        event = codec.decode(msg.data or b"", (m.Observation,))
        stored[event.subject] = msg.subject
    published = {n: catalog.subject_for(m.Observation, subject=n) for n in names}
    assert stored == {n: f"{published[n]}.{catalog.partition_of(n)}" for n in names}
    # Every partition is used: the mapping spreads names, it does not pile them up.
    assert {catalog.partition_of(n) for n in names} == set(ALL)


# --- leases against a real server -------------------------------------------------------


class Member:
    """One process's Leases on its own connection, with hooks that record ownership."""

    def __init__(self, bucket: Bucket, name: str, owners: dict[int, str]) -> None:
        self.name = name
        self.owners = owners
        self.events: list[tuple[str, int]] = []
        self.leases = Leases(bucket, "detector", ALL, acquire=self.acquire,
                             release=self.release, metrics=ActorMetrics("detector"),
                             instance=name)

    async def acquire(self, p: int) -> None:
        # Never two owners at once while both are alive and renewing.
        assert p not in self.owners, f"{self.name} took {p} held by {self.owners[p]}"
        self.owners[p] = self.name
        self.events.append(("acquired", p))

    async def release(self, p: int) -> None:
        assert self.owners.pop(p) == self.name
        self.events.append(("released", p))


async def _member(bus: Bus, name: str, owners: dict[int, str]) -> Member:
    nc = await bus.connect("detector")
    bucket = Bucket(await nc.jetstream().key_value(catalog.PARTITION_BUCKET))
    return Member(bucket, name, owners)


async def _rounds(*members: Member, n: int = 3) -> None:
    for _ in range(n):
        for mem in members:
            await mem.leases.tick()


async def test_leases_split_evenly_rebalance_on_join_and_hand_over_on_stop(bus: Bus) -> None:
    owners: dict[int, str] = {}
    a, b = await _member(bus, "a", owners), await _member(bus, "b", owners)
    await _rounds(a, b)
    assert a.leases.owned == [0, 2, 4, 6] and b.leases.owned == [1, 3, 5, 7]
    assert sorted(owners) == ALL

    c = await _member(bus, "c", owners)
    await _rounds(a, b, c)
    assert sorted(len(x.leases.owned) for x in (a, b, c)) == [2, 3, 3]
    assert sorted(owners) == ALL and ("released", 2) in a.events  # a gave some up

    # c stops (SIGTERM): it hands its partitions over and leaves at once, so the others
    # take them on their next round, long before c's lease would have expired.
    given = c.leases.owned
    await c.leases.hand_over()
    kv = (await bus.connect(catalog.OPERATOR)).jetstream()
    left = await Bucket(await kv.key_value(catalog.PARTITION_BUCKET)).keys("detector.member.")
    assert sorted(left) == ["detector.member.a", "detector.member.b"]
    await _rounds(a, b, n=2)
    assert a.leases.owned == [0, 2, 4, 6] and b.leases.owned == [1, 3, 5, 7]
    assert all(owners[p] in ("a", "b") for p in given)


async def test_a_dead_members_partitions_pass_over_when_its_lease_expires(bus: Bus) -> None:
    owners: dict[int, str] = {}
    a, b = await _member(bus, "a", owners), await _member(bus, "b", owners)
    await _rounds(a, b)
    held_by_b = b.leases.owned
    # b dies: no hand-over, its keys stay until the server expires them.
    for p in held_by_b:
        owners.pop(p)
    await a.leases.tick()
    assert a.leases.owned == [0, 2, 4, 6], "took a partition whose lease is still live"
    deadline = time.monotonic() + catalog.PARTITION_LEASE_S + 10
    while a.leases.owned != ALL:
        assert time.monotonic() < deadline, f"a owns {a.leases.owned}"
        await asyncio.sleep(0.5)
        await a.leases.tick()
    assert sorted(owners) == ALL and set(owners.values()) == {"a"}


async def test_a_lease_found_taken_is_given_up_at_once(bus: Bus) -> None:
    owners: dict[int, str] = {}
    a = await _member(bus, "a", owners)
    await _rounds(a, n=1)
    assert a.leases.owned == ALL
    # Somebody else holds partition 3 now (a was paused past its lease, say).
    kv = (await bus.connect("detector")).jetstream()
    bucket = Bucket(await kv.key_value(catalog.PARTITION_BUCKET))
    await bucket.delete("detector.owner.3")
    assert await bucket.create_bytes("detector.owner.3", b"intruder") is not None
    await a.leases.tick()
    assert 3 not in a.leases.owned and ("released", 3) in a.events


# --- two detector processes, one SIGKILLed ---------------------------------------------------


def _config(names: list[str]) -> str:
    lines = ["[runtime]", "heartbeat_s = 0.5"]
    for name in names:
        lines += [f"[subjects.{name}]", 'kind = "webshop"', 'url = "http://127.0.0.1:9"',
                  "embedded = false"]
    return "\n".join(lines) + "\n"


def _judged(port: int) -> set[str]:
    """The subjects a detector process has evaluated, from its own /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {s.labels["subject"] for fam in text_string_to_metric_families(text)
            if fam.name == "menders_detector_evaluation_seconds"
            for s in fam.samples if s.name.endswith("_count") and s.value > 0}


class Beats:
    """The latest heartbeat of each detector instance, by pid."""

    def __init__(self) -> None:
        self.by_pid: dict[int, m.Heartbeat] = {}

    async def on_msg(self, msg: Any) -> None:
        beat = codec.decode(msg.data, (m.Heartbeat,))
        assert isinstance(beat, m.Heartbeat)
        self.by_pid[beat.pid] = beat


async def test_two_detectors_own_half_each_and_a_killed_ones_half_passes_on(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    names = [f"s{i}" for i in range(16)]
    bus.write_config(_config(names))
    det_a = bus.spawn("detector", MENDERS_INSTANCE="det-a")
    det_b = bus.spawn("detector", MENDERS_INSTANCE="det-b")
    beats = Beats()
    nc = await bus.connect(catalog.OPERATOR)
    await nc.subscribe(catalog.subject_for(m.Heartbeat, actor="detector"), cb=beats.on_msg)

    def split() -> bool:
        a, b = beats.by_pid.get(det_a.pid), beats.by_pid.get(det_b.pid)
        return bool(a and b and len(a.partitions) == len(b.partitions) == len(ALL) // 2
                    and sorted(a.partitions + b.partitions) == ALL)

    await until("two detectors split the partitions", split, within=30,
                explain=lambda: f"{beats.by_pid}\n{det_a.log()[-2000:]}{det_b.log()[-2000:]}")
    part_a = set(beats.by_pid[det_a.pid].partitions)
    # `menders status` tells the same from the leases themselves.
    view = (await partition_owners(nc.jetstream()))["detector"]
    assert view["members"] == ["det-a", "det-b"]
    assert {p for p, who in view["owners"].items() if who == "det-a"} == part_a
    in_a = [n for n in names if catalog.partition_of(n) in part_a]
    in_b = [n for n in names if n not in in_a]
    assert in_a and in_b
    x, y = in_a[0], in_a[1]  # broken before and after det-a dies

    broken: set[str] = set()
    js = (await bus.connect("monitor")).jetstream()

    async def feed() -> None:
        while True:  # every subject, twice a second, stamped now: a live monitor's stream
            for name in names:
                metrics = healthy_metrics(defn)
                if name in broken:
                    metrics[spec.metric] = breaking_value(spec)
                obs = m.Observation(subject=name, producer="monitor", ts=time.time(),
                                    up=True, metrics=metrics)
                await js.publish(catalog.bus_subject_of(obs), codec.encode(obs),
                                 headers={"Nats-Msg-Id": obs.id})
            await asyncio.sleep(0.5)

    feeder = asyncio.create_task(feed())
    try:
        # Each process judges exactly the subjects of its own partitions.
        port_a = beats.by_pid[det_a.pid].metrics_port
        port_b = beats.by_pid[det_b.pid].metrics_port
        await until("both detectors judge their subjects",
                    lambda: _judged(port_a) == set(in_a) and _judged(port_b) == set(in_b),
                    within=15, every=0.5,
                    explain=lambda: f"a={_judged(port_a)} b={_judged(port_b)}")

        async with bus.collect(catalog.under("incident")) as col:
            broken.add(x)
            await col.wait_for(lambda e: isinstance(e, m.IncidentOpened) and e.subject == x,
                               timeout=20)
            det_a.kill()  # SIGKILL: no hand-over, its leases run out on the server
            killed = time.monotonic()
            broken.add(y)
            await until("the survivor owns every partition",
                        lambda: sorted(beats.by_pid[det_b.pid].partitions) == ALL,
                        within=catalog.PARTITION_LEASE_S + 15,
                        explain=lambda: det_b.log()[-3000:])
            # Seen by heartbeat (every 0.5 s here): an upper bound on the hand-over.
            handed_over_s = time.monotonic() - killed
            await col.wait_for(lambda e: isinstance(e, m.IncidentOpened) and e.subject == y,
                               timeout=20)
            broken.clear()
            for name in (x, y):
                await col.wait_for(
                    lambda e, n=name: isinstance(e, m.IncidentResolved) and e.subject == n,
                    timeout=20)
        assert {x, y} <= _judged(port_b)
    finally:
        feeder.cancel()

    opened = await stored(bus, m.IncidentOpened)
    resolved = await stored(bus, m.IncidentResolved)
    assert sorted(e.subject for e in opened) == sorted([x, y]), opened
    assert sorted(e.subject for e in resolved) == sorted([x, y]), resolved
    # x was opened by det-a and resolved by det-b: the same incident, carried over in KV.
    assert {e.incident_id for e in opened} == {e.incident_id for e in resolved}
    assert det_b.alive()
    print("partition-handover: " + json.dumps(
        {"lease_s": catalog.PARTITION_LEASE_S, "kill_to_survivor_owns_all_s":
         round(handed_over_s, 2), "incidents_opened": len(opened),
         "incidents_resolved": len(resolved)}))


# --- two monitor processes, one SIGKILLed ------------------------------------------------


def _scrapes(port: int) -> Counter[str]:
    """Scrapes per subject so far, from a monitor process's own /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    got: Counter[str] = Counter()
    for fam in text_string_to_metric_families(text):
        if fam.name == "menders_monitor_scrapes":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    got[s.labels["subject"]] += int(s.value)
    return got


async def _scraping(port: int, seconds: float = 2.5) -> set[str]:
    """The subjects a monitor process scrapes now: those its counters moved for."""
    before = _scrapes(port)
    await asyncio.sleep(seconds)
    after = _scrapes(port)
    return {name for name in after if after[name] > before[name]}


def _fleet(port: int, n: int) -> subprocess.Popen[bytes]:
    """bench/scale.py's synthetic fleet: n /metrics pages on one port."""
    return subprocess.Popen([sys.executable, "bench/scale.py", "serve", "--port", str(port),
                             "--subjects", str(n)], cwd=REPO, stdin=subprocess.DEVNULL)


async def _replies(nc: Any, subject: str) -> int:
    """How many monitors answer one query about `subject` (exactly one should)."""
    inbox = nc.new_inbox()
    got: list[bytes] = []

    async def on_reply(msg: Any) -> None:
        got.append(msg.data)

    sub = await nc.subscribe(inbox, cb=on_reply)
    query = ObsQuery(subject=subject, observations=ObservationsInput())
    await nc.publish(catalog.service_subject("monitor", "observations"),
                     msgspec.json.encode(query), reply=inbox)
    await asyncio.sleep(1.0)
    await sub.unsubscribe()
    assert all(msgspec.json.decode(r, type=ObsReply).ok for r in got), got
    return len(got)


async def test_two_monitors_scrape_half_each_and_a_killed_ones_half_is_scraped_again(
        bus: Bus) -> None:
    n = 16
    port = free_port()
    fleet = _fleet(port, n)
    try:
        # Metrics on (each process a free port), heartbeats quick.
        bus.write_config(fleet_config(port, n, metrics=True, log_level="INFO",
                                      runtime_extra="heartbeat_s = 0.5\n"))
        mon_a = bus.spawn("monitor", MENDERS_INSTANCE="mon-a")
        mon_b = bus.spawn("monitor", MENDERS_INSTANCE="mon-b")
        beats = Beats()
        nc = await bus.connect(catalog.OPERATOR)
        await nc.subscribe(catalog.subject_for(m.Heartbeat, actor="monitor"), cb=beats.on_msg)
        await until("two monitors split the partitions",
                    lambda: all(len(getattr(beats.by_pid.get(p.pid), "partitions", ())) == 4
                                for p in (mon_a, mon_b)),
                    within=30, explain=lambda: f"{beats.by_pid}\n{mon_a.log()[-2000:]}")
        names = {f"s{i}" for i in range(n)}
        part_a = set(beats.by_pid[mon_a.pid].partitions)
        in_a = {s for s in names if catalog.partition_of(s) in part_a}
        port_a = beats.by_pid[mon_a.pid].metrics_port
        port_b = beats.by_pid[mon_b.pid].metrics_port
        # Whoever started first scraped everything for a moment, then handed half over.
        assert await _scraping(port_a) == in_a
        assert await _scraping(port_b) == names - in_a
        assert all([await _replies(nc, s) == 1 for s in sorted(names)])

        mon_a.kill()
        await until("the survivor holds every partition",
                    lambda: len(beats.by_pid[mon_b.pid].partitions) == len(ALL),
                    within=catalog.PARTITION_LEASE_S + 15,
                    explain=lambda: mon_b.log()[-2000:])
        assert await _scraping(port_b) == names
        # Observations of the dead monitor's subjects are on the bus again.
        async with bus.collect(catalog.under("obs")) as col:
            await until("observations of every subject",
                        lambda: {e.subject for e in col.events(m.Observation)} == names,
                        within=5)
        assert await _replies(nc, sorted(in_a)[0]) == 1
    finally:
        fleet.terminate()
        fleet.wait(10)
