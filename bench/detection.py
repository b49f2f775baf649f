"""Detection latency: fault injected -> incident opened, minus the invariant's for-duration.

    python bench/detection.py [--rounds 1] [--fault NAME ...]

One nats-server, the real webshop (its own process, with its built-in load
generator and its chaos port) and the real monitor (1 s scrape) and detector,
each its own process. For each fault, in each round:

1. wait for a healthy baseline (observations flowing, the shop up, no incident
   open, for 2 s);
2. stamp t0 = time.time() and inject the fault through the chaos port (which no
   actor knows);
3. take the first IncidentOpened after t0 and compute
   `opened.ts - t0 - for_s` (for_s of the invariant that opened);
4. clear the fault through the chaos port and wait until every incident it
   opened is resolved by the detector.

No diagnoser, planner or executor runs: the shop is restored by the chaos
port's clear, not by the crew.

Two kinds of fault: *step* faults change the service at once (leaked pool,
slow replica, bad config, cache off, upstream down); *ramp* faults grow (the
memory leak allocates ~30 MB/s, the log flood writes ~10 MB/s), so their
metric needs seconds to reach its threshold after the injection. Their
injected -> opened number includes that growth; `breach_to_open_minus_for_s`
(from the first observation that breaks the invariant) does not, and is
reported for every fault.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from common import REPO, bench_bus, machine, subject_config, summary_ms, write_result

from actors.stack.natsserver import free_port
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from subjects.webshop.invariants import INVARIANTS

SUBJECT = "webshop"
GOAL_S = 1.1
STEP_FAULTS = ("pool_exhaustion", "slow_dependency", "bad_config", "cache_off", "upstream_down")
RAMP_FAULTS = ("memory_leak", "log_flood")
FOR_S = {i.name: i.for_s for i in INVARIANTS}
SPEC = {i.name: i for i in INVARIANTS}


def config(url: str) -> str:
    return subject_config(SUBJECT, url, embedded=True)


class Watch:
    def __init__(self) -> None:
        self.observations: list[m.Observation] = []
        self.opened: list[m.IncidentOpened] = []
        self.open: dict[str, str] = {}  # incident id -> invariant
        self.changed = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        try:
            event = codec.decode(msg.data)
        except codec.DecodeError:
            return
        if isinstance(event, m.Observation):
            self.observations.append(event)
        elif isinstance(event, m.IncidentOpened):
            self.opened.append(event)
            self.open[event.incident_id] = event.invariant
        elif isinstance(event, m.IncidentResolved):
            self.open.pop(event.incident_id, None)
        else:
            return
        self.changed.set()

    async def until(self, cond: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 0.25))
            except TimeoutError:
                pass
        return True

    async def healthy(self, hold_s: float, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        since: float | None = None
        while time.monotonic() < deadline:
            last = self.observations[-1] if self.observations else None
            fresh = last is not None and time.time() - last.ts < 2.5 and last.up
            if fresh and not self.open:
                since = since or time.monotonic()
                if time.monotonic() - since >= hold_s:
                    return True
            else:
                since = None
            await self.until(lambda: False, 0.25)
        return False


def first_breach(obs: list[m.Observation], t0: float, invariant: str) -> float | None:
    """The ts of the first observation after t0 that breaks `invariant` (thresholds only)."""
    spec = SPEC[invariant]
    for o in obs:
        if o.ts < t0:
            continue
        if not o.up and spec.down_breaks:
            return o.ts
        value = o.metrics.get(spec.metric)
        if value is None:
            continue
        broken = value >= spec.threshold if spec.op == "<" else value <= spec.threshold
        if broken:
            return o.ts
    return None


async def chaos(session: aiohttp.ClientSession, base: str, method: str, fault: str) -> None:
    async with session.request(method, f"{base}/faults/{fault}",
                               timeout=aiohttp.ClientTimeout(total=10)) as resp:
        if resp.status >= 400:
            raise RuntimeError(f"chaos {method} {fault}: HTTP {resp.status}")


async def bench(faults: list[str], rounds: int) -> dict[str, Any]:
    started = time.monotonic()
    port, chaos_port = free_port(), free_port()
    url, chaos_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{chaos_port}"
    samples: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="menders-bench-detect-") as tmp:
        async with bench_bus(Path(tmp), config(url)) as bus:
            data_dir = bus.home / "subjects" / SUBJECT
            data_dir.mkdir(parents=True)
            log = open(bus.home / "webshop.log", "wb")  # noqa: ASYNC230 - before timing
            shop = subprocess.Popen(  # noqa: ASYNC220 - started once, before timing
                [sys.executable, "-m", "subjects.webshop", "serve", "--host", "127.0.0.1",
                 "--port", str(port), "--chaos-port", str(chaos_port),
                 "--data-dir", str(data_dir)], stdout=log, stderr=log, cwd=REPO)
            log.close()
            bus.procs.append(shop)  # stopped with the bus
            bus.spawn("detector")
            bus.spawn("monitor")
            await bus.wait_heartbeats({"detector": 1, "monitor": 1})
            watch = Watch()
            op = await bus.connect(catalog.OPERATOR)
            await op.subscribe(catalog.EVERYTHING, cb=watch.on_msg)
            if not await watch.healthy(3.0, 40):
                raise RuntimeError(f"no healthy baseline; logs in {bus.home}")
            async with aiohttp.ClientSession() as session:
                for r in range(rounds):
                    for fault in faults:
                        samples.append(await one(watch, session, chaos_url, fault, r))
    return _result(samples, faults, rounds, time.monotonic() - started)


async def one(watch: Watch, session: aiohttp.ClientSession, chaos_url: str, fault: str,
              r: int) -> dict[str, Any]:
    if not await watch.healthy(2.0, 40):
        raise RuntimeError(f"not healthy before {fault}: open {watch.open}")
    n_opened = len(watch.opened)
    t0 = time.time()
    await chaos(session, chaos_url, "POST", fault)
    try:
        if not await watch.until(lambda: len(watch.opened) > n_opened, 30):
            return {"fault": fault, "round": r, "detected": False}
        first = watch.opened[n_opened]
        for_s = FOR_S[first.invariant]
        breach = first_breach(watch.observations, t0, first.invariant)
        return {"fault": fault, "round": r, "detected": True, "invariant": first.invariant,
                "for_s": for_s,
                "injected_to_open_s": round(first.ts - t0, 4),
                "minus_for_s": round(first.ts - t0 - for_s, 4),
                "breach_to_open_minus_for_s":
                    None if breach is None else round(first.ts - breach - for_s, 4)}
    finally:
        await chaos(session, chaos_url, "DELETE", fault)
        await watch.until(lambda: not watch.open, 40)


def _result(samples: list[dict[str, Any]], faults: list[str], rounds: int,
            elapsed: float) -> dict[str, Any]:
    detected = [s for s in samples if s["detected"]]
    step = [s["minus_for_s"] for s in detected if s["fault"] in STEP_FAULTS]
    ramp = [s["minus_for_s"] for s in detected if s["fault"] in RAMP_FAULTS]
    allv = [s["minus_for_s"] for s in detected]
    breach = [s["breach_to_open_minus_for_s"] for s in detected
              if s["breach_to_open_minus_for_s"] is not None]
    per_fault: dict[str, Any] = {}
    for f in faults:
        xs = [s["minus_for_s"] for s in detected if s["fault"] == f]
        per_fault[f] = {"detected": f"{len(xs)}/{rounds}",
                        "minus_for_s": [round(x, 3) for x in xs],
                        "invariants": sorted({s["invariant"] for s in detected
                                              if s["fault"] == f})}
    step_max = max(step) if step else None
    all_max = max(allv) if allv else None
    missed = len(samples) - len(detected)
    return {
        "bench": "detection",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "setup": {"faults": faults, "rounds": rounds, "scrape_interval_s": 1.0,
                  "for_s": sorted(set(FOR_S.values()))},
        "injected_to_open_minus_for_s": {
            "step_faults": summary_ms(step), "ramp_faults": summary_ms(ramp),
            "all_faults": summary_ms(allv)},
        "first_breach_to_open_minus_for_s": summary_ms(breach),
        "per_fault": per_fault,
        "missed": missed,
        "samples": samples,
        "goal": {"metric": "injected_to_open_minus_for_s, max over step faults (s)",
                 "at_most": GOAL_S, "value": step_max,
                 "met": bool(step_max is not None and step_max <= GOAL_S and missed == 0),
                 "all_faults_max_s": all_max,
                 "all_faults_met": bool(all_max is not None and all_max <= GOAL_S
                                        and missed == 0)},
        "elapsed_s": round(elapsed, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--fault", action="append", choices=(*STEP_FAULTS, *RAMP_FAULTS),
                   help="only this fault (repeatable); default: all seven")
    args = p.parse_args()
    faults = args.fault or [*STEP_FAULTS, *RAMP_FAULTS]
    result = asyncio.run(bench(faults, args.rounds))
    print(write_result("detection", result))


if __name__ == "__main__":
    main()
