"""Kill-switch propagation: engaged -> every executor stopped.

    python bench/kill_switch.py [--executors 3] [--rounds 30]

One nats-server and E real executor processes (one durable consumer, each its
own credentials). The managed subject `bench` is a webshop-kind subject whose
action endpoint blocks forever (a local HTTP server that never answers), so an
execution runs until something cancels it.

Each round:
1. The bench plays the governor: it publishes ExecutionApproved events with
   the governor's credentials (only the governor user may), one at a time,
   until every executor process holds at least one running execution. Which
   process holds which is read from the executor ledger (its `owner`); an
   execution counts as running once the blocking endpoint has its request.
2. It engages the kill switch as the operator does (`actors.cli.operator.engage_kill`:
   the KV flag, written directly, stamped `at`).
3. It waits for every execution's ExecutionResult (status `cancelled`) and
   takes `finished_at - at` for each: the time for the flag to reach that
   executor through its KV watch and for the running action to be cancelled.
   A round's number is the slowest execution of the round: every executor
   stopped.
4. It releases the flag as the governor's resume does (actors.runtime.killswitch.release:
   a put by the operator releases nothing) and starts again.

No governor process runs, so the bench writes the mode (`execute`) as admin and
releases with the governor's credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Recorder, bench_bus, machine, subject_config, summary_ms, write_result

from actors.cli import operator
from actors.executor.ledger import Ledger
from actors.runtime import killswitch
from actors.runtime.kv import Bucket
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.governor import KILL_KEY, MODE_KEY, parse_kill

SUBJECT = "bench"
GOAL_P99_MS = 20.0
MAX_APPROVALS_PER_ROUND = 8


def config(recorder_url: str) -> str:
    return subject_config(SUBJECT, recorder_url)


class Results:
    def __init__(self) -> None:
        self.started: dict[str, m.ExecutionStarted] = {}
        self.results: dict[str, m.ExecutionResult] = {}
        self.changed = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        try:
            event = codec.decode(msg.data, (m.ExecutionStarted, m.ExecutionResult))
        except codec.DecodeError:
            return
        if isinstance(event, m.ExecutionStarted):
            self.started.setdefault(event.execution_id, event)
        elif isinstance(event, m.ExecutionResult):
            self.results.setdefault(event.execution_id, event)
        self.changed.set()

    async def until(self, cond: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"timed out waiting for {what}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 0.1))
            except TimeoutError:
                pass


def approval(round_no: int, i: int) -> m.ExecutionApproved:
    eid = m.new_id()
    plan_id = m.new_id()
    step = m.PlanStep(step_id=f"r{round_no}s{i}", action="recycle_pool", risk="low",
                      idempotent=True, timeout_s=60.0)
    return m.ExecutionApproved(incident_id=m.new_id(), subject=SUBJECT, execution_id=eid,
                               plan_id=plan_id, step=step, approved_by="bench",
                               not_after=time.time() + 60)


async def bench(executors: int, rounds: int) -> dict[str, Any]:
    started = time.monotonic()
    recorder = Recorder(block=True)
    await recorder.start()
    per_exec: list[float] = []
    per_round: list[float] = []
    statuses: dict[str, int] = {}
    approvals_needed: list[int] = []
    try:
        with tempfile.TemporaryDirectory(prefix="menders-bench-kill-") as tmp:
            async with bench_bus(Path(tmp), config(recorder.url)) as bus:
                pids = {bus.spawn("executor", f"-{i}").pid for i in range(executors)}
                await bus.wait_heartbeats({"executor": executors})
                admin = await bus.connect(catalog.ADMIN)
                ajs = admin.jetstream(timeout=10)
                gkv_admin = await ajs.key_value(catalog.GOVERNOR_BUCKET)
                await gkv_admin.put(MODE_KEY, b"execute")
                ledger = Ledger(await ajs.key_value(catalog.EXEC_LEDGER_BUCKET))
                op = await bus.connect(catalog.OPERATOR)
                okv = await op.jetstream(timeout=10).key_value(catalog.GOVERNOR_BUCKET)
                res = Results()
                await op.subscribe(catalog.under("exec"), cb=res.on_msg)
                gov = await bus.connect("governor")
                gkv_gov = Bucket(await gov.jetstream(timeout=10).key_value(
                    catalog.GOVERNOR_BUCKET))
                for r in range(rounds):
                    await killswitch.release(gkv_gov, "bench", "next round")
                    holders: set[int] = set()
                    eids: list[str] = []
                    while holders != pids:
                        if len(eids) >= MAX_APPROVALS_PER_ROUND:
                            raise RuntimeError(f"round {r}: {len(eids)} approvals reached "
                                               f"only {len(holders)} of {executors} executors")
                        ap = approval(r, len(eids))
                        calls_before = len(recorder.calls)
                        await bus.publish(gov, ap, "governor")
                        eids.append(ap.execution_id)
                        await res.until(lambda n=calls_before: len(recorder.calls) > n, 15,
                                        f"round {r}: the action call of {ap.execution_id}")
                        got = await ledger.read(ap.execution_id)
                        assert got is not None, ap.execution_id
                        holders.add(owner_pid(got.entry.owner))
                    approvals_needed.append(len(eids))
                    await operator.engage_kill(op, "bench", f"round {r}")
                    flag = parse_kill(await Bucket(okv).get_bytes(KILL_KEY))
                    await res.until(lambda ids=eids: all(e in res.results for e in ids), 15,
                                    f"round {r}: every execution's result")
                    lat = []
                    for e in eids:
                        result = res.results[e]
                        statuses[result.status] = statuses.get(result.status, 0) + 1
                        lat.append(result.finished_at - flag.at)
                    per_exec += lat
                    per_round.append(max(lat))
    finally:
        await recorder.stop()
    rnd = summary_ms(per_round)
    return {
        "bench": "kill_switch",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "setup": {"executors": executors, "rounds": rounds,
                  "running_executions_per_round": summary_counts(approvals_needed),
                  "kill_by": "actors.cli.operator.engage_kill (the operator writes the KV flag)"},
        "every_executor_stopped": rnd,
        "per_execution": summary_ms(per_exec),
        "result_statuses": statuses,
        "goal": {"metric": "every_executor_stopped.p99_ms", "at_most": GOAL_P99_MS,
                 "value": rnd.get("p99_ms"),
                 "met": bool(rnd.get("p99_ms") is not None
                             and float(rnd["p99_ms"]) <= GOAL_P99_MS
                             and set(statuses) == {"cancelled"})},
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def owner_pid(owner: str) -> int:
    """The PID in a ledger owner (host/pid/token)."""
    return int(owner.split("/")[1])


def summary_counts(xs: list[int]) -> dict[str, float]:
    return {"min": min(xs), "max": max(xs), "mean": round(sum(xs) / len(xs), 2)} if xs else {}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--executors", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    result = asyncio.run(bench(args.executors, args.rounds))
    print(write_result("kill_switch", result))


if __name__ == "__main__":
    main()
