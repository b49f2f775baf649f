"""The `menders` command line.

Exit codes: 0 success, 1 the operation failed, 2 bad usage or config,
3 NATS unreachable or refused us.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from actors.cli import operator
from actors.runtime import config as config_mod
from actors.runtime import credentials, logs
from actors.runtime.config import Config, ConfigError
from bus_schemas import catalog, codec, render
from bus_schemas import messages as m
from bus_schemas.errors import MendersError
from bus_schemas.governor import MODE_KEY, parse_mode, plan_revoked_key, revoked_key

EXIT_FAILED, EXIT_USAGE, EXIT_NATS = 1, 2, 3


class CliError(MendersError):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# The one table from error class to exit status; the first match wins, anything
# else of ours is EXIT_FAILED. 2: fix the command line or the config; 3: the bus.
EXIT_CODES: tuple[tuple[type[MendersError], int], ...] = (
    (ConfigError, EXIT_USAGE),
    (credentials.CredentialsError, EXIT_NATS),
    (operator.OperatorError, EXIT_NATS),
)


def exit_code(exc: MendersError) -> int:
    if isinstance(exc, CliError):
        return exc.code
    return next((code for cls, code in EXIT_CODES if isinstance(exc, cls)), EXIT_FAILED)


def _load(args: argparse.Namespace) -> Config:
    return config_mod.load(args.config)


# --- commands ------------------------------------------------------------------------


async def cmd_run(args: argparse.Namespace) -> int:
    from actors.runtime import Runtime
    from actors.runtime.registry import actor_class

    config = _load(args)
    logs.setup(args.actor, config.runtime.log_level)
    try:
        cls = actor_class(args.actor)
    except KeyError as exc:
        raise CliError(str(exc.args[0]), EXIT_USAGE) from None
    rt = Runtime(args.actor, config)
    await rt.run(cls)
    return 0


async def cmd_up(args: argparse.Namespace) -> int:
    from actors.stack.up import Stack

    config = _load(args)
    logs.setup("supervisor", config.runtime.log_level)
    started = time.monotonic()
    stack = Stack(config, args.config, nats_url=args.nats_url,
                  embedded_subjects=not args.no_subjects, child_logs=args.child_logs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stack.start()
        await stack.wait_ready()
        assert stack.supervisor is not None
        ready = time.monotonic() - started
        pids = stack.supervisor.pids()
        print(f"menders up: ready in {ready:.2f}s; NATS {stack.url}; "
              f"{len(stack.actors)} actors: "
              + ", ".join(f"{n}={p}" for n, p in pids.items() if n in stack.actors)
              + "".join(f"; {n} pid {p}" for n, p in pids.items() if n not in stack.actors),
              flush=True)
        if args.ready_only:
            return 0
        watch = asyncio.ensure_future(stack.supervisor.watch())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({watch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if watch.done() and watch.exception():
            raise CliError(str(watch.exception()))
        watch.cancel()
        return 0
    finally:
        print("menders up: stopping", file=sys.stderr, flush=True)
        await stack.stop()


async def cmd_provision(args: argparse.Namespace) -> int:
    from actors.stack import provision

    config = _load(args)
    async with operator.connect(config, user=catalog.ADMIN) as nc:
        report = await provision.provision(nc.jetstream(timeout=10), replicas=args.replicas)
    for item in report.created:
        print(f"created {item}")
    for item in report.updated:
        print(f"ok      {item}")
    return 0


async def cmd_tail(args: argparse.Namespace) -> int:
    config = _load(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    count = 0
    async with operator.connect(config) as nc:

        async def on_msg(msg: Any) -> None:
            nonlocal count
            if args.json:
                print(msg.data.decode(errors="replace"), flush=True)
            else:
                try:
                    print(render.line(codec.decode(msg.data), msg.subject), flush=True)
                except codec.DecodeError as exc:
                    print(f"?? {msg.subject}: undecodable ({exc})", flush=True)
            count += 1
            if args.count and count >= args.count:
                stop.set()

        await nc.subscribe(args.pattern, cb=on_msg)
        if args.seconds:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), args.seconds)
        else:
            await stop.wait()
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    async with operator.connect(config) as nc:
        st = await operator.status(nc, config.runtime.heartbeat_s, args.stuck_after)
    if args.json:
        print(json.dumps(st.__dict__, indent=2, default=str))
        return 0 if st.healthy else EXIT_FAILED
    print(f"mode: {st.mode}")
    kill = st.kill
    print("kill switch: " + (f"ENGAGED by {kill['by']}: {kill['reason']}"
                             if kill.get("engaged") else "released"))
    print("actors:")
    for name, a in st.actors.items():
        if a["alive"]:
            state = (f"{'STUCK' if a['stuck'] else 'alive':<6} pid={a['pid']} "
                     f"last beat {a['age_s']}s ago handled={a['handled']} "
                     f"metrics=:{a['metrics_port']}")
            if a["in_flight"]:
                state += (f" in_flight={a['in_flight']} "
                          f"oldest in flight {a['oldest_in_flight_s']:.1f}s")
            if a["stuck"]:
                state += f" (> {a['stuck_after_s']:g}s: a handler is hung)"
        elif a.get("age_s") is not None:
            state = f"DEAD   (last beat {a['age_s']}s ago)"
        else:
            state = "DEAD   (never seen)"
        print(f"  {name:<10} {state}")
    escalated = [i for i in st.open_incidents if i["state"] == "escalated"]
    print(f"open incidents: {len(st.open_incidents)}"
          + (f" ({len(escalated)} escalated to a human, still broken)" if escalated else ""))
    for inc in st.open_incidents:
        print(f"  {inc['incident_id'][:8]} {inc['subject']} {inc['invariant']}: "
              f"{_incident_state(inc)}{inc['summary']}")
    if st.pending_approvals:
        print(f"waiting for a human: {len(st.pending_approvals)} "
              "(menders approve|deny <execution id>)")
        for p in st.pending_approvals:
            if p.get("unreadable"):
                print(f"  {p['execution_id']}  (unreadable record)")
                continue
            left = p["expires_at"] - time.time()
            print(f"  {p['execution_id']}  {p['subject']} {p['action']} for incident "
                  f"{p['incident_id'][:8]}, denied in {max(0.0, left):.0f}s: {p['reason']}")
    if st.bad_events:
        print(f"undecodable incident events: {len(st.bad_events)} (skipped), e.g.")
        for line in st.bad_events[-3:]:
            print(f"  {line}")
    for actor, part in st.partitions.items():
        free = [p for p, who in part["owners"].items() if who is None]
        print(f"{actor} partitions: {len(part['members'])} member(s)"
              + (f", {len(free)} unowned ({', '.join(map(str, free))})" if free else ""))
        for member in part["members"]:
            mine = [p for p, who in part["owners"].items() if who == member]
            print(f"  {member:<24} {', '.join(map(str, mine)) or '-'}")
    print("consumer lag (pending / awaiting ack):")
    for name, c in st.consumers.items():
        print(f"  {name:<14} {c['pending']:>6} / {c['ack_pending']}")
    return 0 if st.healthy else EXIT_FAILED


def _incident_state(inc: dict[str, Any]) -> str:
    """What the crew is doing about an open incident, as a prefix of its line."""
    view = inc.get("planner", {})
    recurring = f"RECURRING x{inc['recurring']}, " if inc.get("recurring") else ""
    if inc["state"] == "escalated":
        return f"{recurring}ESCALATED, still broken: "
    if inc["state"] == "parked":
        left = max(0.0, view.get("retry_at", 0.0) - time.time())
        return (f"{recurring}PARKED ({view.get('obstacle')}: {view.get('reason')}; "
                f"next try within {left:.0f}s): ")
    if view.get("state") in ("working", "re-diagnosing", "following"):
        what = view["state"] + (f" attempt {view['attempt']} {view['action']}"
                                if view["state"] == "working" and view.get("action") else "")
        return f"{recurring}{what}: "
    return recurring


async def _control(args: argparse.Namespace, event: m.Event, confirm: Callable[[bytes], bool],
                   key: str, done: str) -> int:
    config = _load(args)
    async with operator.connect(config) as nc:
        await operator.publish(nc, event)
        if await operator.wait_for(nc, key, confirm, args.wait):
            print(done)
            return 0
    print(f"published, but the governor has not confirmed within {args.wait:g}s "
          "(is it running? `menders status`)", file=sys.stderr)
    return EXIT_FAILED


async def cmd_mode(args: argparse.Namespace) -> int:
    event = m.ControlCommand(command="mode", mode=args.mode, by=args.by, reason=args.reason)
    return await _control(args, event, lambda v: parse_mode(v) == args.mode, MODE_KEY,
                          f"mode is now {args.mode}")


async def cmd_kill(args: argparse.Namespace) -> int:
    config = _load(args)
    async with operator.connect(config) as nc:
        await operator.engage_kill(nc, args.by, args.reason)
    print("kill switch ENGAGED: no execution starts, running ones are cancelled")
    return 0


async def cmd_resume(args: argparse.Namespace) -> int:
    config = _load(args)
    event = m.ControlCommand(command="resume", by=args.by, reason=args.reason)
    async with operator.connect(config) as nc:
        await operator.publish(nc, event)
        if await operator.wait_released(nc, args.wait):
            print("kill switch released")
            return 0
    print(f"published, but the governor has not released the kill switch within "
          f"{args.wait:g}s (is it running? `menders status`)", file=sys.stderr)
    return EXIT_FAILED


async def cmd_revoke(args: argparse.Namespace) -> int:
    if args.plan:
        event = m.ControlCommand(command="revoke", plan_id=args.execution_id, by=args.by,
                                 reason=args.reason)
        return await _control(args, event, lambda v: True, plan_revoked_key(args.execution_id),
                              f"plan {args.execution_id} revoked: its running steps are "
                              "cancelled, no further step starts")
    event = m.ControlCommand(command="revoke", execution_id=args.execution_id, by=args.by,
                             reason=args.reason)
    return await _control(args, event, lambda v: True, revoked_key(args.execution_id),
                          f"execution {args.execution_id} revoked")


async def _approval(args: argparse.Namespace, approved: bool) -> int:
    config = _load(args)
    event = m.HumanApproval(execution_id=args.execution_id, approved=approved, by=args.by,
                            reason=args.reason)
    async with operator.connect(config) as nc:
        await operator.publish(nc, event)
    print(f"{'approval' if approved else 'denial'} of {args.execution_id} sent to the governor")
    return 0


async def cmd_approve(args: argparse.Namespace) -> int:
    return await _approval(args, True)


async def cmd_deny(args: argparse.Namespace) -> int:
    return await _approval(args, False)


async def cmd_retry(args: argparse.Namespace) -> int:
    """Put an incident back in the loop (an escalated one above all): the planner asks
    for a fresh diagnosis with a fresh attempt budget, or re-plans a parked one now."""
    config = _load(args)
    async with operator.connect(config) as nc:
        incidents, _ = await operator.open_incidents(nc.jetstream())
        found = [i for i in incidents if i["incident_id"].startswith(args.incident)]
        if len(found) != 1:
            what = "no open incident" if not found else f"{len(found)} open incidents"
            raise CliError(f"{what} match {args.incident!r} (`menders status` lists them)")
        inc = found[0]
        event = m.RetryRequested(incident_id=inc["incident_id"], subject=inc["subject"],
                                 by=args.by, reason=args.reason)
        col: asyncio.Queue[m.Event] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            try:
                e = codec.decode(msg.data)
            except codec.DecodeError:
                return
            if e.causation_id == event.id:
                await col.put(e)

        # What the planner answers a retry with: a fresh diagnosis asked, or a new plan.
        subs = [await nc.subscribe(catalog.subject_for(k, subject=inc["subject"]), cb=on_msg)
                for k in (m.Plan, m.DiagnosisRequested)]
        await operator.publish(nc, event)
        print(f"retry of incident {inc['incident_id']} ({inc['state']}) sent to the planner")
        try:
            answer = await asyncio.wait_for(col.get(), args.wait)
        except TimeoutError:
            print(f"the planner did not take it up within {args.wait:g}s: it is being worked "
                  "already, or the planner is down (`menders status`)", file=sys.stderr)
            return EXIT_FAILED
        finally:
            for s_ in subs:
                await s_.unsubscribe()
        print(f"planner: {render.summary(answer)}")
    return 0


async def cmd_audit(args: argparse.Namespace) -> int:
    from actors.cli.audit import run_audit

    return await run_audit(_load(args), args)


async def cmd_check_config(args: argparse.Namespace) -> int:
    """Every problem of the config file, each with its key path; exit 2 if any."""
    from actors.cli.configcheck import problems_of

    path = args.file or args.config or os.environ.get("MENDERS_CONFIG")
    if not path:
        raise CliError("menders check-config: name a file (or --config, or $MENDERS_CONFIG)",
                       EXIT_USAGE)
    problems = problems_of(path)
    for p in problems:
        print(f"{path}: {p}", file=sys.stderr)
    if problems:
        return EXIT_USAGE
    print(f"{path}: ok")
    return 0


async def cmd_subjects(args: argparse.Namespace) -> int:
    """One line per installed subject kind: where it comes from and its actions."""
    import subjects

    for kind in subjects.kinds():
        origin = "built-in" if subjects.is_builtin(kind) else "plugin"
        try:
            definition = subjects.load(kind)
        except Exception as exc:  # a broken plugin is listed, not fatal
            print(f"{kind:<14} {origin:<8} BROKEN: {exc}")
            continue
        acts = ", ".join(f"{n}[{a.risk}{', disruptive' if a.disruptive else ''}]"
                         for n, a in definition.actions.items()) or (
            "actions declared per subject in TOML" if "specialise" in definition.extra
            else "no actions")
        print(f"{kind:<14} {origin:<8} {acts}")
    return 0


async def cmd_eval(args: argparse.Namespace) -> int:
    from actors.cli.eval.command import cmd_eval as run_eval

    return await run_eval(_load(args), args)


async def cmd_demo(args: argparse.Namespace) -> int:
    from actors.cli.demo import run_demo

    return await run_demo(_load(args), args)


# --- parser -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="menders", description="An autonomous SRE crew on NATS.")
    p.add_argument("--config", help="TOML config file (default: $MENDERS_CONFIG, else defaults)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
            help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    up = add("up", cmd_up, "start NATS, provision, and supervise every actor")
    up.add_argument("--nats-url", help="use this NATS server instead of the bundled one")
    up.add_argument("--no-subjects", action="store_true",
                    help="do not start the embedded demo subject(s)")
    up.add_argument("--child-logs", action="store_true",
                    help="write each actor's log to <home>/logs/<actor>.log")
    up.add_argument("--ready-only", action="store_true", help="exit once everything is ready")
    add("subjects", cmd_subjects, "list the installed subject kinds and their actions")
    check = add("check-config", cmd_check_config, "validate a config file: every error, "
                "with its key path")
    check.add_argument("file", nargs="?", help="the TOML file (default: --config)")
    run = add("run", cmd_run, "run one actor in this process")
    run.add_argument("actor", choices=catalog.ACTORS)
    prov = add("provision", cmd_provision, "create or update streams, consumers and KV buckets")
    prov.add_argument("--replicas", type=int, default=1, choices=(1, 3, 5),
                      help="JetStream replicas per stream and bucket (3 on a 3-node cluster)")
    tail = add("tail", cmd_tail, "print one line per bus event")
    tail.add_argument("pattern", nargs="?", default=catalog.EVERYTHING,
                      help=f"bus subject pattern (default {catalog.EVERYTHING})")
    tail.add_argument("--json", action="store_true", help="print the raw JSON payloads")
    tail.add_argument("--count", type=int, default=0, help="stop after this many events")
    tail.add_argument("--seconds", type=float, default=0, help="stop after this long")
    st = add("status", cmd_status, "actors, mode, kill switch, open incidents, consumer lag")
    st.add_argument("--json", action="store_true")
    st.add_argument("--stuck-after", type=float, default=None, metavar="SECONDS",
                    help="flag an actor STUCK when its oldest in-flight message is older "
                         "(default: 3 x its longest ack_wait, at least 120 s)")
    mode = add("mode", cmd_mode, "set the governor's mode")
    mode.add_argument("mode", choices=("observe", "approve", "execute"))
    kill = add("kill", cmd_kill, "engage the kill switch: stop every execution now")
    resume = add("resume", cmd_resume, "release the kill switch (through the governor)")
    revoke = add("revoke", cmd_revoke, "revoke one queued or running execution, or a "
                 "whole plan (--plan)")
    revoke.add_argument("execution_id", metavar="id", help="an execution id, or with --plan "
                        "a plan id")
    revoke.add_argument("--plan", action="store_true", help="the id is a plan's: cancel its "
                        "running steps and start none of the rest")
    approve = add("approve", cmd_approve, "approve an execution awaiting a human")
    approve.add_argument("execution_id")
    deny = add("deny", cmd_deny, "deny an execution awaiting a human")
    deny.add_argument("execution_id")
    retry = add("retry", cmd_retry, "work an escalated (or parked) incident again: a fresh "
                "diagnosis and a fresh attempt budget")
    retry.add_argument("incident", help="incident id (or a unique prefix)")
    for sp in (mode, kill, resume, revoke, approve, deny, retry):
        sp.add_argument("--by", default="operator", help="who you are, for the record")
        sp.add_argument("--reason", default="", help="why, for the record")
        sp.add_argument("--wait", type=float, default=5.0,
                        help="seconds to wait for the governor to confirm")
    audit = add("audit", cmd_audit, "print an incident's timeline, or verify the audit chain")
    audit.add_argument("incident", nargs="?", help="incident id (or a unique prefix)")
    audit.add_argument("--verify", action="store_true", help="check the hash chain")
    audit.add_argument("--db", help="audit database (default <home>/audit.db)")
    audit.add_argument("--json", action="store_true")
    demo = add("demo", cmd_demo, "run the whole crew against the demo subject's faults")
    from actors.cli.demo import add_arguments as demo_arguments

    demo_arguments(demo)  # one list of demo flags, shared with `python -m actors.cli.demo`
    ev = add("eval", cmd_eval, "measure the crew: campaigns of scenarios, scored by "
             "oracles, with a report")
    from actors.cli.eval.command import add_arguments as eval_arguments

    eval_arguments(ev)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(args.fn(args))
    except MendersError as exc:
        print(f"menders {args.command}: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `menders status | head`: the reader has gone, which is not an error. Point
        # stdout at devnull so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


__all__ = ["main"]
