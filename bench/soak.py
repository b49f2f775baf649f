"""The crew under fire: scenarios back to back while actors and the broker are killed.

    python bench/soak.py --minutes 10                      # every subject, default chaos
    python bench/soak.py --minutes 3 --subjects webshop --sync-always

For each subject kind in turn (its share of `--minutes`), the eval harness's stack runs
(`menders up`'s own Stack and Supervisor: the crew, the embedded subject, the embedded
nats-server) and the kind's single-fault scenarios are injected back to back
(`actors.cli.eval.campaign.run_trial`, human approvals as the scenario says). Beside them,
a chaos task of this bench's own:

- SIGKILLs a random crew actor every `--kill-every` seconds, and the executor within
  0-300 ms of an `exec.started` it sees (every other one, at most one per 10 s): in the
  middle of a step, or between its effect and its report;
- SIGKILLs the embedded nats-server `--broker-restarts` times, evenly spread; the
  supervisor starts it again and every actor must reconnect and go on alone.

When the time is up the chaos stops, the crew is given `--drain` seconds to end every
incident, and the bench reads the whole MENDERS_EVENTS stream (not a live subscription,
which misses what was published while the broker was down) and checks:

- `lost`: incidents opened and neither resolved nor escalated;
- `doubled`: actions the subject carried out (counted in its own action log, the
  oracle's `effects`) beyond the governor's approvals of that action and the designed
  re-runs (`idempotent_reruns`: an idempotent step whose executor died mid-step runs
  again, a non-idempotent one never does), plus execution ids that succeeded twice;
- the audit record's hash chain verifies and holds every lifecycle event;
- every durable consumer drained (nothing pending, nothing unacked);
- every dead letter carries a reason;
- restarts per actor, broker restarts, incidents per minute, and incident opened ->
  first execution started (the control plane, from the events' own timestamps).

Ends with one JSON line on stdout (and bench/results/soak[_sync_always].json).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, pct, write_result

from actors.cli.eval import campaign, scenarios
from actors.cli.eval.records import Trial
from actors.runtime.config import Config
from bus_schemas import catalog, codec
from bus_schemas import messages as m

KINDS = ("webshop", "ratelimiter", "kvcluster")
EXECUTOR_KILL_GAP_S = 10.0


@dataclass
class Chaos:
    """What the chaos task did, and the pids it saw, per actor."""

    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    executor_mid_step: int = 0
    broker_kills: int = 0
    pids: dict[str, set[int]] = field(default_factory=lambda: collections.defaultdict(set))

    def restarts(self) -> dict[str, int]:
        return {a: len(p) - 1 for a, p in sorted(self.pids.items())}


async def chaos(env: campaign.Env, stop: asyncio.Event, seconds: float, kill_every: float,
                broker_restarts: int, rng: random.Random, did: Chaos) -> None:
    sup, server = env.stack.supervisor, env.stack.server
    assert sup is not None and server is not None
    crew = [a for a in catalog.ACTORS if a in sup.children]
    t0 = time.monotonic()
    broker_at = [seconds * (k + 0.5) / broker_restarts for k in range(broker_restarts)]
    next_kill = kill_every
    last_exec_kill = 0.0

    def kill(actor: str) -> None:
        pid = sup.pids().get(actor)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # a child this bench's stack started
            did.kills[actor] += 1

    async def on_event(msg: Any) -> None:
        nonlocal last_exec_kill
        if stop.is_set() or not msg.subject.startswith(f"{catalog.PREFIX}.exec."):
            return
        with contextlib.suppress(Exception):
            event = codec.decode(msg.data, (m.ExecutionStarted,))
            now = time.monotonic()
            if isinstance(event, m.ExecutionStarted) and now - last_exec_kill > \
                    EXECUTOR_KILL_GAP_S and rng.random() < 0.5:
                last_exec_kill = now
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                kill("executor")
                did.executor_mid_step += 1

    sub = await env.nc.subscribe(f"{catalog.PREFIX}.exec.>", cb=on_event)
    try:
        while not stop.is_set():
            for name, pid in sup.pids().items():
                did.pids[name].add(pid)
            elapsed = time.monotonic() - t0
            if elapsed >= next_kill:
                kill(rng.choice(crew))
                next_kill += kill_every
            if broker_at and elapsed >= broker_at[0]:
                broker_at.pop(0)
                if server.pid is not None and not sup.broker_down.is_set():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(server.pid, signal.SIGKILL)
                    did.broker_kills += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


# --- reading what happened, from the stream ---------------------------------------------


async def stream_events(env: campaign.Env) -> tuple[list[m.Event], list[m.DeadLetter]]:
    """Every event in MENDERS_EVENTS and every dead letter, read by sequence."""
    import nats

    nc = await nats.connect(env.stack.url, user=catalog.ADMIN,
                            password=env.stack.passwords[catalog.ADMIN])
    try:
        jsm = nc.jsm()
        out: dict[str, list[Any]] = {}
        for stream in (catalog.EVENTS_STREAM, catalog.DLQ_STREAM):
            info = await jsm.stream_info(stream)
            got = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    raw = await jsm.get_msg(stream, seq)
                except Exception:  # a deleted sequence
                    continue
                with contextlib.suppress(Exception):
                    got.append(codec.decode(raw.data or b"", m.ALL_MESSAGES))
            out[stream] = got
        return out[catalog.EVENTS_STREAM], [d for d in out[catalog.DLQ_STREAM]
                                            if isinstance(d, m.DeadLetter)]
    finally:
        await nc.close()


async def consumers_pending(env: campaign.Env) -> dict[str, int]:
    import nats

    nc = await nats.connect(env.stack.url, user=catalog.ADMIN,
                            password=env.stack.passwords[catalog.ADMIN])
    try:
        jsm = nc.jsm()
        pending = {}
        for c in catalog.CONSUMERS:
            info = await jsm.consumer_info(c.stream, c.durable)
            pending[c.durable] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        return pending
    finally:
        await nc.close()


def unended(events: list[m.Event]) -> set[str]:
    opened = {e.incident_id for e in events if isinstance(e, m.IncidentOpened)}
    ended = {e.incident_id for e in events
             if isinstance(e, m.IncidentResolved | m.IncidentEscalated)}
    return opened - ended


def idempotent_reruns(events: list[m.Event]) -> collections.Counter[str]:
    """Per action: the designed second runs. An executor that finds an idempotent step's
    owner lost mid-step runs it again (its effect may or may not have happened, and a
    repeat is harmless by definition); a non-idempotent one is reported `unknown`, never
    repeated. Each re-run is a second exec.started of one execution id."""
    step_of = {e.execution_id: e.step for e in events if isinstance(e, m.ExecutionApproved)}
    starts = collections.Counter(e.execution_id for e in events
                                 if isinstance(e, m.ExecutionStarted))
    out: collections.Counter[str] = collections.Counter()
    for execution_id, n in starts.items():
        step = step_of.get(execution_id)
        if step is not None and step.idempotent and n > 1:
            out[step.action] += n - 1
    return out


def opened_to_started_ms(events: list[m.Event]) -> list[float]:
    """Per incident: its opening to the first execution of a plan for it."""
    opened = {e.incident_id: e.ts for e in events if isinstance(e, m.IncidentOpened)}
    incident_of = {e.plan_id: e.incident_id for e in events if isinstance(e, m.Plan)}
    first: dict[str, float] = {}
    for e in events:
        if isinstance(e, m.ExecutionStarted) and e.plan_id in incident_of:
            inc = incident_of[e.plan_id]
            first[inc] = min(first.get(inc, e.ts), e.ts)
    return [1000 * (first[i] - opened[i]) for i in first if i in opened]


# --- one subject kind -------------------------------------------------------------------


async def soak_kind(kind: str, seconds: float, args: argparse.Namespace,
                    rng: random.Random) -> dict[str, Any]:
    pool = [s for s in scenarios.catalog(kind) if s.kind == "fault"]
    variant = scenarios.BUILTIN_VARIANTS["runbook"]
    did = Chaos()
    trials: list[Trial] = []
    harness_errors: list[str] = []
    async with campaign.environment(kind, variant, Config(),
                                    sync_always=args.sync_always) as env:
        sup = env.stack.supervisor
        assert sup is not None
        watch = asyncio.ensure_future(sup.watch())  # what `menders up` runs: restarts
        _, _, effects0 = await env.oracle.read()
        stop = asyncio.Event()
        started = time.monotonic()
        chaos_task = asyncio.ensure_future(chaos(env, stop, seconds, args.kill_every,
                                                 args.broker_restarts, rng, did))
        try:
            k = 0
            while time.monotonic() - started < seconds and not watch.done():
                scenario = pool[k % len(pool)]
                k += 1
                trial = Trial(campaign="soak", subject=kind, scenario=scenario.name,
                              scenario_kind=scenario.kind, variant="crew/runbook",
                              repeat=k, expected=scenario.right_answer, cause=scenario.cause,
                              limit_s=scenario.limit_s or 60.0, settle_s=3.0)
                try:
                    if did.broker_kills:  # the live timeline missed what the outage hid
                        env.tl.events = (await stream_events(env))[0]
                    trial = await campaign.run_trial(env, scenario, trial)
                except Exception as exc:  # the broker was down under the harness too
                    trial.error = f"harness: {type(exc).__name__}: {exc}"[:300]
                if trial.error:
                    harness_errors.append(f"{scenario.name}: {trial.error}")
                trials.append(trial)
                print(json.dumps({"kind": kind, "scenario": scenario.name, "won": trial.won,
                                  "why": trial.why[:120], "error": trial.error[:120]}),
                      file=sys.stderr, flush=True)
        finally:
            stop.set()
            await chaos_task
        soaked = time.monotonic() - started
        # The drain: the crew ends what it has open, with no chaos.
        deadline = time.monotonic() + args.drain
        while True:
            events, letters = await stream_events(env)
            pending = await consumers_pending(env)
            open_ids = unended(events)
            if (not open_ids and not any(pending.values())) or time.monotonic() > deadline:
                break
            await asyncio.sleep(2.0)
        drained_s = round(args.drain - max(deadline - time.monotonic(), 0.0), 1)
        _, _, effects1 = await env.oracle.read()
        verified, missing = await campaign.audit_check(env.stack.home, events)
        gave_up = sup.gave_up
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watch
    effects = {a: n - effects0.get(a, 0) for a, n in effects1.items()
               if n > effects0.get(a, 0)}
    approved = collections.Counter(e.step.action for e in events
                                   if isinstance(e, m.ExecutionApproved))
    reruns = idempotent_reruns(events)
    allowed = approved + reruns
    over = {a: n - allowed.get(a, 0) for a, n in effects.items() if n > allowed.get(a, 0)}
    succeeded = collections.Counter(e.execution_id for e in events
                                    if isinstance(e, m.ExecutionResult)
                                    and e.status == "succeeded")
    twice = sorted(x for x, n in succeeded.items() if n > 1)
    opened = sum(1 for e in events if isinstance(e, m.IncidentOpened))
    control = opened_to_started_ms(events)
    return {
        "kind": kind,
        "seconds": round(soaked, 1),
        "trials": len(trials),
        "trials_won": sum(t.won for t in trials),
        "harness_errors": harness_errors,
        "incidents_opened": opened,
        "incidents_ended": opened - len(open_ids),
        "lost": len(open_ids),
        "lost_ids": sorted(open_ids),
        "effects_at_subject": effects,
        "approvals": dict(approved),
        "doubled": sum(over.values()) + len(twice),
        "doubled_actions": over,
        "idempotent_reruns": dict(reruns),
        "executions_succeeded_twice": twice,
        "audit_verified": verified,
        "audit_missing": missing,
        "consumers_pending": {c: n for c, n in pending.items() if n},
        "drain_s": drained_s,
        "dead_letters": len(letters),
        "dead_letters_without_reason": sum(1 for d in letters if not d.reason.strip()),
        "kills": dict(did.kills),
        "executor_killed_mid_step": did.executor_mid_step,
        "broker_kills": did.broker_kills,
        "broker_restarts": sup.broker_restarts,
        "restarts": did.restarts(),
        "supervisor_gave_up": gave_up,
        "incidents_per_min": round(opened / (soaked / 60), 2) if soaked else 0.0,
        "opened_to_started_ms": {"n": len(control),
                                 "p50": round(pct(control, 50), 1) if control else None,
                                 "p99": round(pct(control, 99), 1) if control else None},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    kinds = args.subjects
    share = args.minutes * 60 / len(kinds)
    rows = [await soak_kind(kind, share, args, rng) for kind in kinds]
    ok = all(r["lost"] == 0 and r["doubled"] == 0 and r["audit_verified"]
             and not r["audit_missing"] and not r["consumers_pending"]
             and not r["dead_letters_without_reason"] and not r["supervisor_gave_up"]
             for r in rows)
    return {"bench": "soak", "minutes": args.minutes, "sync_always": args.sync_always,
            "seed": args.seed, "lost": sum(r["lost"] for r in rows),
            "doubled": sum(r["doubled"] for r in rows), "ok": ok, "subjects": rows,
            "machine": machine()}


def main() -> int:
    p = argparse.ArgumentParser(prog="soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--subjects", type=lambda s: s.split(","), default=list(KINDS),
                   help="comma-separated subject kinds (default: all)")
    p.add_argument("--kill-every", type=float, default=15.0,
                   help="seconds between SIGKILLs of a random crew actor")
    p.add_argument("--broker-restarts", type=int, default=2, help="per subject kind")
    p.add_argument("--drain", type=float, default=120.0,
                   help="seconds the crew is given to end its incidents after the chaos")
    p.add_argument("--sync-always", action="store_true",
                   help="nats-server fsyncs every write (the durability run)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    unknown = [k for k in args.subjects if k not in KINDS]
    if unknown or args.minutes <= 0 or args.kill_every <= 0 or args.broker_restarts < 0:
        p.error(f"bad arguments (unknown subjects {unknown}; minutes and kill-every must be "
                "positive, broker-restarts not negative)")
    result = asyncio.run(run(args))
    name = "soak_sync_always" if args.sync_always else "soak"
    write_result(name, result)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
