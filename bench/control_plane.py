"""Control-plane latency: incident opened -> execution started, through the real actors.

    python bench/control_plane.py [--incidents 200] [--warmup 10]

One nats-server (loopback, temp dir, the generated nats.conf) and the real
diagnoser (runbook rules), planner, governor (execute mode) and executor, each
its own process with its own credentials, plus the monitor (the diagnoser asks
it for the subject's log lines before the break) and the auditor: the runbook
diagnoser asks the auditor's incident memory (`menders.query.audit.similar`)
for similar past incidents before it answers, so the auditor is on the path.
The managed subject `bench` is a webshop-kind subject whose action endpoint
is a local HTTP recorder that answers at once, so the number is the crew's,
not the action's.

The bench publishes, as the detector user, an IncidentOpened whose symptoms
match the webshop's `pool_leak` runbook rule (pool_utilization 0.97), waits
for the executor's ExecutionStarted of that incident and its ExecutionResult,
then publishes the incident's IncidentResolved (as the detector) so that the
planner closes it: the next incident is not a follower of this one ("one
cause, one fix") and gets its own plan. Incidents go one at a time, so each
measures an idle pipeline, not a queue. The governor's rate limits, cooldown
and concurrency cap are raised in the bench's config so that none vetoes.

Latency = ExecutionStarted.ts - IncidentOpened.ts, both envelope stamps
(time.time() in two processes of one host). `hops` splits it by the envelope
stamps of the Diagnosis, Plan and ExecutionApproved between them; an envelope
is stamped when its event is built, which may be before the producer's last
I/O (the diagnoser builds its Diagnosis, then asks the incident memory), so
`hops_by_arrival` splits it again by when each event reached the bench's own
subscription (a core NATS subscriber on the same host).

`in_handlers` says where each hop's time goes: the mean time the hop's actor spent
in its handler (decode to ack: its KV reads and writes, its queries to other actors,
its publishes), from that actor's own `menders_handler_duration_seconds`, against the
hop's mean by arrival; the rest is the bus (publish, store, deliver) and waiting for
the CPU. The executor's handler includes running the action, so its share is not
split.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools
import urllib.request

import control_floor
from common import Recorder, bench_bus, machine, subject_config, summary_ms, write_result
from prometheus_client.parser import text_string_to_metric_families

from bus_schemas import catalog, codec
from bus_schemas import messages as m

SUBJECT = "bench"
GOAL_P99_MS = 10.0  # issue 13: opened -> execution started, p99
PER_INCIDENT_TIMEOUT_S = 15.0
# Each hop by arrival, and the actor and message kind whose handler it mostly is.
HANDLER_OF = {"opened_to_diagnosis": ("diagnoser", "incident.opened"),
              "diagnosis_to_plan": ("planner", "diagnosis"),
              "plan_to_approved": ("governor", "plan")}


def config(recorder_url: str) -> str:
    # Limits out of the way: the bench measures latency, not the governor's vetoes.
    # Metrics on: `in_handlers` reads the handler times.
    return subject_config(SUBJECT, recorder_url, metrics=True, extra=f"""\
[governor]
mode = "execute"
approval_above = "high"
max_per_subject_per_minute = 1000000
max_per_minute = 1000000
action_cooldown_s = 0.0
max_concurrent = 1000
allow = {{ {SUBJECT} = ["*"] }}

""")


class Tracker:
    """Every lifecycle event of the bench's incidents, by incident and kind."""

    def __init__(self) -> None:
        self.by_incident: dict[str, dict[type[m.Event], m.Event]] = {}
        self.metrics_ports: dict[str, int] = {}
        self.arrived: dict[str, dict[type[m.Event], float]] = {}  # when the bench got it
        self.changed = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        try:
            event = codec.decode(msg.data)
        except codec.DecodeError:
            return
        if isinstance(event, m.Heartbeat):
            self.metrics_ports[event.actor] = event.metrics_port
            self.changed.set()
            return
        if isinstance(event, m.Observation) or not event.incident_id:
            return
        self.by_incident.setdefault(event.incident_id, {}).setdefault(type(event), event)
        self.arrived.setdefault(event.incident_id, {}).setdefault(type(event), time.time())
        self.changed.set()

    async def ports_of(self, actors: set[str], timeout: float) -> None:
        """Until a heartbeat has named each actor's metrics port (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while not actors <= self.metrics_ports.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                return  # in_handlers then leaves the hop out
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def wait(self, incident: str, kind: type[m.Event], timeout: float) -> m.Event:
        deadline = time.monotonic() + timeout
        while True:
            got = self.by_incident.get(incident, {}).get(kind)
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [k.__name__ for k in self.by_incident.get(incident, {})]
                raise RuntimeError(f"no {kind.__name__} for incident {incident} within "
                                   f"{timeout:g}s; seen {seen}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass


def incident(i: int) -> m.IncidentOpened:
    return m.IncidentOpened(
        incident_id=m.new_id(), subject=SUBJECT, invariant="pool_saturation",
        summary=f"bench incident {i}: pool_utilization 0.97 >= 0.9", value=0.97, threshold=0.9,
        symptoms={"pool_utilization": 0.97, "p99_ms": 40.0, "error_rate": 0.0},
        recent_logs=['{"level": "warning", "msg": "pool wait 120 ms"}'])


async def bench(n: int, warmup: int) -> dict[str, Any]:
    started = time.monotonic()
    recorder = Recorder()
    await recorder.start()
    try:
        with tempfile.TemporaryDirectory(prefix="menders-bench-cp-") as tmp:
            async with bench_bus(Path(tmp), config(recorder.url)) as bus:
                # The monitor too: the diagnoser asks it for the log lines before the
                # break (the loop as deployed; it answers from memory).
                actors = ("auditor", "monitor", "governor", "executor", "planner",
                          "diagnoser")
                for actor in actors:
                    bus.spawn(actor)
                await bus.wait_heartbeats(dict.fromkeys(actors, 1))
                tracker = Tracker()
                op = await bus.connect(catalog.OPERATOR)
                await op.subscribe(catalog.EVERYTHING, cb=tracker.on_msg)
                det = await bus.connect("detector")
                ids: list[str] = []
                for i in range(n + warmup):
                    opened = incident(i)
                    await bus.publish(det, opened, "detector")
                    await tracker.wait(opened.incident_id, m.ExecutionStarted,
                                       PER_INCIDENT_TIMEOUT_S)
                    await tracker.wait(opened.incident_id, m.ExecutionResult,
                                       PER_INCIDENT_TIMEOUT_S)
                    await bus.publish(det, m.IncidentResolved(
                        incident_id=opened.incident_id, subject=SUBJECT,
                        invariant=opened.invariant, reason="bench: next incident"), "detector")
                    ids.append(opened.incident_id)
                calls = len(recorder.calls)
                # A short run can end before the first heartbeat that names each port.
                await tracker.ports_of({actor for actor, _ in HANDLER_OF.values()}, 5.0)
                handlers = {a: _handler_means(port)
                            for a, port in tracker.metrics_ports.items() if port}
                # The same broker work by bare nats-py relays, on this server, now.
                floor = await control_floor.floor(bus.url, bus.passwords[catalog.ADMIN],
                                                  n, warmup, bus.home)
    finally:
        await recorder.stop()
    result = _result(tracker, ids[warmup:], n, warmup, calls, time.monotonic() - started)
    result["in_handlers"] = _breakdown(result["hops_by_arrival"], handlers)
    crew = result["opened_to_started"]
    result["raw_floor"] = floor
    result["ratios"] = {f"{q}_crew_over_floor": round(crew[f"{q}_ms"] / floor[f"{q}_ms"], 3)
                        for q in ("p50", "p99")}
    return result


def _handler_means(port: int) -> dict[str, float]:
    """Mean handler time (ms) per message kind, from one actor's own /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "menders_handler_duration_seconds":
            continue
        for s in fam.samples:
            if s.name.endswith("_sum"):
                sums[s.labels["kind"]] = s.value
            elif s.name.endswith("_count"):
                counts[s.labels["kind"]] = s.value
    return {k: round(sums[k] / c * 1000, 3) for k, c in counts.items() if c and k in sums}


def _breakdown(by_arrival: dict[str, dict[str, Any]],
               handlers: dict[str, dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for hop, (actor, kind) in HANDLER_OF.items():
        hop_ms = by_arrival.get(hop, {}).get("mean_ms")
        handler_ms = handlers.get(actor, {}).get(kind)
        if hop_ms is None or handler_ms is None:
            continue
        out[hop] = {"hop_mean_ms": hop_ms, "handler_mean_ms": handler_ms,
                    "bus_and_scheduling_ms": round(hop_ms - handler_ms, 3),
                    "handler_share": round(handler_ms / hop_ms, 3) if hop_ms else None}
    return out


def _result(tracker: Tracker, ids: list[str], n: int, warmup: int, calls: int,
            elapsed: float) -> dict[str, Any]:
    total: list[float] = []
    hops: dict[str, list[float]] = {"opened_to_diagnosis": [], "diagnosis_to_plan": [],
                                    "plan_to_approved": [], "approved_to_started": []}
    arrival: dict[str, list[float]] = {k: [] for k in hops}
    statuses: dict[str, int] = {}
    chain = (m.IncidentOpened, m.Diagnosis, m.Plan, m.ExecutionApproved, m.ExecutionStarted)
    for iid in ids:
        ev = tracker.by_incident[iid]
        total.append(ev[m.ExecutionStarted].ts - ev[m.IncidentOpened].ts)
        for name, (a, b) in zip(hops, itertools.pairwise(chain), strict=True):
            if a in ev and b in ev:
                hops[name].append(ev[b].ts - ev[a].ts)
                got = tracker.arrived[iid]
                arrival[name].append(got[b] - (ev[a].ts if a is m.IncidentOpened else got[a]))
        res = ev[m.ExecutionResult]
        assert isinstance(res, m.ExecutionResult)
        statuses[res.status] = statuses.get(res.status, 0) + 1
    lat = summary_ms(total)
    return {
        "bench": "control_plane",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "setup": {"incidents": n, "warmup_not_counted": warmup, "diagnoser": "runbook",
                  "mode": "execute", "one_at_a_time": True,
                  "action_endpoint": "local HTTP recorder (answers at once)"},
        "opened_to_started": lat,
        "hops": {k: summary_ms(v) for k, v in hops.items()},
        "hops_by_arrival": {k: summary_ms(v) for k, v in arrival.items()},
        "execution_statuses": statuses,
        "action_calls_recorded": calls,
        "goal": {"metric": "opened_to_started.p99_ms", "at_most": GOAL_P99_MS,
                 "value": lat.get("p99_ms"),
                 "met": bool(lat.get("p99_ms") is not None
                             and float(lat["p99_ms"]) <= GOAL_P99_MS)},
        "elapsed_s": round(elapsed, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--incidents", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()
    result = asyncio.run(bench(args.incidents, args.warmup))
    print(write_result("control_plane", result))


if __name__ == "__main__":
    main()
