"""The detector as a real process, fed synthetic observations as the monitor.

Observations carry their own timestamps, one second apart as the monitor
scrapes, published back to back: the detector judges observation time, so
the tests are quick and exact about which observation opens or resolves.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from bus_schemas import catalog
from bus_schemas import messages as m
from subjects.base import InvariantSpec
from tests.harness import SHOP as SUBJECT
from tests.harness import SHOP_CONFIG as CONFIG
from tests.harness import Bus, Collector, Feed, breaking_value, latency, stored, webshop

pytestmark = pytest.mark.timeout(60)


def band_value(spec: InvariantSpec) -> float:
    """Between the clear and the break limit: neither breaks nor clears."""
    assert spec.clear is not None
    return (spec.clear + spec.threshold) / 2


def incidents(col: Collector) -> list[m.Event]:
    return [e for e in col.events()
            if isinstance(e, m.IncidentOpened | m.IncidentUpdated | m.IncidentResolved)]


def opened(col: Collector) -> list[m.IncidentOpened]:
    return col.events(m.IncidentOpened)


async def start_detector(bus: Bus) -> None:
    bus.write_config(CONFIG)
    bus.spawn("detector")
    await bus.wait_heartbeat("detector")


async def settle(seconds: float = 1.5) -> None:
    """Let the detector finish what it was sent, so a stray event would show."""
    await asyncio.sleep(seconds)


async def test_sustained_breach_opens_exactly_one_incident_then_resolves(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    await start_detector(bus)
    feed = Feed(await bus.connect("monitor"), defn)
    n_bad = int(spec.for_s) + 6
    async with bus.collect(catalog.under("incident")) as col:
        await feed.many(3)
        bad = await feed.many(n_bad, {spec.metric: breaking_value(spec)})
        # Log lines travel with the incident as data.
        await feed.send({spec.metric: breaking_value(spec)}, logs=["ERROR db timeout"])
        good = await feed.many(int(spec.for_s) + 3)
        resolved = await col.wait_for(lambda e: isinstance(e, m.IncidentResolved))
        await settle()

    [inc] = opened(col)
    assert inc.invariant == spec.name and inc.subject == SUBJECT
    # Opened by the first observation that had been breaking for for_s.
    first_bad = bad[0].ts
    expected = next(o for o in bad if o.ts - first_bad >= spec.for_s)
    assert inc.causation_id == expected.id
    assert inc.value == breaking_value(spec) and inc.threshold == spec.threshold
    assert inc.symptoms[spec.metric] == breaking_value(spec)
    assert resolved[0].incident_id == inc.incident_id == inc.incident_id
    clear_from = good[0].ts
    assert resolved[0].causation_id == next(
        o for o in good if o.ts - clear_from >= spec.for_s).id
    # Nothing else: no duplicate, no flapping, no other invariant touched.
    kinds = [type(e).__name__ for e in incidents(col)]
    assert kinds.count("IncidentOpened") == 1 and kinds.count("IncidentResolved") == 1


async def test_short_breaches_and_threshold_flapping_open_nothing(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    bad, band = breaking_value(spec), band_value(spec)
    await start_detector(bus)
    feed = Feed(await bus.connect("monitor"), defn)
    short = max(int(spec.for_s) - 1, 1)  # lasts short - 1 seconds < for_s
    async with bus.collect(catalog.under("incident")) as col:
        for _ in range(4):  # breaches shorter than for_s, and values around the threshold
            await feed.many(short, {spec.metric: bad})
            await feed.send({spec.metric: band})
        sustained = await feed.many(int(spec.for_s) + 2, {spec.metric: bad})
        [inc] = await col.wait_for(lambda e: isinstance(e, m.IncidentOpened))
        # Only the sustained breach opened it, at its for_s mark.
        assert inc.causation_id == next(
            o for o in sustained if o.ts - sustained[0].ts >= spec.for_s).id
        # Open: hovering between clear and threshold must not resolve it.
        for _ in range(3):  # a healthy blip shorter than for_s, the band, a breach
            await feed.send({spec.metric: spec.clear * 0.5 if spec.clear else 0.0})
            await feed.many(2, {spec.metric: band})
            await feed.send({spec.metric: bad})
        good = await feed.many(int(spec.for_s) + 2)
        [res] = await col.wait_for(lambda e: isinstance(e, m.IncidentResolved))
        await settle()
    assert res.incident_id == inc.incident_id
    assert res.causation_id == next(o for o in good if o.ts - good[0].ts >= spec.for_s).id
    assert len(opened(col)) == 1 and len(col.events(m.IncidentResolved)) == 1


async def test_restarted_detector_keeps_the_open_incident(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    bad = {spec.metric: breaking_value(spec)}
    bus.write_config(CONFIG)
    first = bus.spawn("detector")
    await bus.wait_heartbeat("detector")
    feed = Feed(await bus.connect("monitor"), defn, step=0.5)
    async with bus.collect(catalog.under("incident")) as col:
        await feed.many(int(spec.for_s * 2) + 2, bad)
        [inc] = await col.wait_for(lambda e: isinstance(e, m.IncidentOpened))
        first.kill()  # a crash: no drain, no goodbye
        await feed.many(4, bad)  # a backlog while it is down
        started = time.time()
        bus.spawn("detector")
        await bus.wait_heartbeat("detector", after=started)
        feed.ts = max(feed.ts, time.time())
        await feed.many(10, bad)  # still broken, now fresh
        await feed.many(int(spec.for_s * 2) + 4)
        [res] = await col.wait_for(lambda e: isinstance(e, m.IncidentResolved))
        await settle()
    assert res.incident_id == inc.incident_id
    # A republish after the crash may be seen on the wire; it carries the same id.
    assert {e.id for e in opened(col)} == {inc.id}
    [kept] = await stored(bus, m.IncidentOpened)
    assert kept.id == inc.id
    assert [e.incident_id for e in await stored(bus, m.IncidentResolved)] == [inc.incident_id]


async def test_stale_backlog_opens_nothing_until_a_fresh_observation(bus: Bus) -> None:
    defn = await webshop()
    spec = latency(defn)
    bad = {spec.metric: breaking_value(spec)}
    await start_detector(bus)
    # A backlog breaking all along, each observation older than the detector
    # trusts (STALE_AFTER_S = 5 s), ending shortly before now.
    n = int(spec.for_s) + 10
    feed = Feed(await bus.connect("monitor"), defn, start=time.time() - 7 - n)
    async with bus.collect(catalog.under("incident")) as col:
        await feed.many(n, bad)
        await settle()
        assert incidents(col) == []
        feed.ts = time.time()
        fresh = await feed.send(bad)
        [inc] = await col.wait_for(lambda e: isinstance(e, m.IncidentOpened))
        await settle()
    # The backlog moved the timer, the fresh observation opened it.
    assert inc.causation_id == fresh.id
    assert len(opened(col)) == 1


async def test_subject_down_is_a_symptom(bus: Bus) -> None:
    defn = await webshop()
    down_specs = [s for s in defn.invariants if s.down_breaks]
    if not down_specs:
        pytest.skip("the webshop definition has no down_breaks invariant")
    await start_detector(bus)
    feed = Feed(await bus.connect("monitor"), defn)
    async with bus.collect(catalog.under("incident")) as col:
        await feed.many(2)
        await feed.many(int(max(s.for_s for s in down_specs)) + 2, up=False)
        found = await col.wait_for(lambda e: isinstance(e, m.IncidentOpened),
                                   count=len(down_specs))
        await settle()
    assert {e.invariant for e in found} == {s.name for s in down_specs}
    assert all("not answering" in e.summary for e in found)
    assert len(opened(col)) == len(down_specs)
