"""`menders up`: one OS process per child, restarted one-for-one with backoff.

Like an OTP supervisor: a child that dies is restarted alone, after an
exponential backoff. Each child is watched by a task of its own, so one
child's backoff never delays another's restart. Two restart policies:

- the crew (the actors): more than `max_restarts` restarts within
  `max_seconds` and the supervisor gives up loudly, stopping everything: an
  actor that cannot stay up is a bug a human must see. Deaths while the
  broker is down do not count: a dependency's outage is not the actor's loop.
- `keep_trying` children (a managed subject launched by `menders up`): never
  given up on. The crew watches them; a subject that crash-loops is an
  incident for the crew (it scrapes a dead service as down), never a reason to
  stop the crew. The backoff doubles up to `backoff_max_s` and each restart is
  logged once.

The embedded nats-server, when there is one, is kept alive the same way
(`Restartable`): reaped the moment it dies (no zombie), restarted on the same
port with the same store and config after a capped backoff, with no bound on
the number of restarts, each one logged once. The actors reconnect by
themselves.

Children start in order (consumers before producers) and stop in reverse
order. Each child is its own session (Ctrl-C reaches only the supervisor,
which stops them in order) and dies with the supervisor (PR_SET_PDEATHSIG), so
none is orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from actors.runtime.config import SupervisorConfig
from actors.runtime.logs import get_logger
from bus_schemas.errors import MendersError

log = get_logger("menders.supervisor")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: str | None = None  # None: inherit the supervisor's stderr
    # Never given up on (a managed subject): restarted with a capped backoff for ever.
    keep_trying: bool = False
    role: str = "child"  # how the logs name it: "child died, restarting"


@dataclass
class Child:
    spec: ChildSpec
    proc: asyncio.subprocess.Process | None = None
    restarts: deque[float] = field(default_factory=deque)
    started_at: float = 0.0
    backoff_s: float = 0.0


class GaveUp(MendersError, RuntimeError):
    pass


class Restartable(Protocol):
    """A dependency kept alive beside the children: the embedded nats-server."""

    name: str

    @property
    def pid(self) -> int | None: ...

    async def wait_exit(self) -> int | None:
        """Once it has died: its exit code, the process reaped."""

    async def restart(self) -> None:
        """Start it again, ready to serve; raises if it cannot."""


class Supervisor:
    def __init__(self, specs: list[ChildSpec], config: SupervisorConfig,
                 broker: Restartable | None = None) -> None:
        self.config = config
        self.children = {s.name: Child(s) for s in specs}
        self.broker = broker
        self.broker_restarts = 0
        # Set while the broker is dead or not yet serving again.
        self.broker_down = asyncio.Event()
        self.stopping = asyncio.Event()
        self.gave_up: str | None = None

    def pids(self) -> dict[str, int]:
        return {n: c.proc.pid for n, c in self.children.items() if c.proc is not None}

    async def _spawn(self, child: Child) -> None:
        spec = child.spec
        # A local log file opens in microseconds; the child owns it after fork.
        out = open(spec.log_path, "ab") if spec.log_path else None  # noqa: ASYNC230
        try:
            child.proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=spec.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out or sys.stderr,
                stderr=out or sys.stderr,
                start_new_session=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            if out:
                out.close()
        child.started_at = time.monotonic()
        log.info("started", extra={"child": spec.name, "pid": child.proc.pid})

    async def start(self) -> None:
        for child in self.children.values():
            await self._spawn(child)

    async def watch(self) -> None:
        """Restart children (and the broker) as they die, until stopped or given up.

        One task per child: a child waiting out its backoff delays nobody else.
        GaveUp (a crew child in a crash loop) ends the watch and is raised."""
        tasks: list[asyncio.Future[object]] = [
            asyncio.ensure_future(self._keep(c)) for c in self.children.values()
            if c.proc is not None]
        if self.broker is not None:
            tasks.append(asyncio.ensure_future(self._keep_broker(self.broker)))
        stop: asyncio.Future[object] = asyncio.ensure_future(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                done, _ = await asyncio.wait({*tasks, stop},
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stop:
                        tasks.remove(task)
                        task.result()  # GaveUp, or a bug in the supervisor: raised
        finally:
            stop.cancel()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _keep(self, child: Child) -> None:
        while not self.stopping.is_set():
            assert child.proc is not None
            await child.proc.wait()
            if self.stopping.is_set():
                return
            await self._restart(child)

    async def _restart(self, child: Child) -> None:
        assert child.proc is not None
        code = child.proc.returncode
        now = time.monotonic()
        spec = child.spec
        if not (self.broker_down.is_set() and not spec.keep_trying):
            # A crew child that died while its broker was down is not in a loop of its own.
            child.restarts.append(now)
        while child.restarts and now - child.restarts[0] > self.config.max_seconds:
            child.restarts.popleft()
        if not spec.keep_trying and len(child.restarts) > self.config.max_restarts:
            self.gave_up = (
                f"{spec.name} died {len(child.restarts)} times within "
                f"{self.config.max_seconds:g}s (last exit code {code}); giving up"
            )
            log.error("giving up", extra={"child": spec.name, "exit_code": code})
            self.stopping.set()
            raise GaveUp(self.gave_up)
        # A child that ran a while healthy starts its backoff over.
        if now - child.started_at > self.config.max_seconds:
            child.backoff_s = 0.0
        child.backoff_s = min(
            max(child.backoff_s * 2, self.config.backoff_initial_s), self.config.backoff_max_s
        )
        log.warning(
            f"{spec.role} died, restarting",
            extra={"child": spec.name, "exit_code": code, "backoff_s": child.backoff_s,
                   "deaths_within_max_seconds": len(child.restarts)},
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), child.backoff_s)
        if not self.stopping.is_set():
            await self._spawn(child)

    async def _keep_broker(self, broker: Restartable) -> None:
        """Reap a dead broker at once, restart it with a capped backoff, for ever."""
        cfg = self.config
        backoff = 0.0
        started = time.monotonic()
        while not self.stopping.is_set():
            code = await broker.wait_exit()  # reaped: no zombie
            if self.stopping.is_set():
                return
            self.broker_down.set()
            died = time.monotonic()
            if died - started > cfg.max_seconds:
                backoff = 0.0  # it ran a while healthy: start the backoff over
            backoff = min(max(backoff * 2, cfg.backoff_initial_s), cfg.backoff_max_s)
            log.error(f"{broker.name} died, restarting",
                      extra={"exit_code": code, "backoff_s": backoff,
                             "restarts": self.broker_restarts})
            failures = 0
            while not self.stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), backoff)
                if self.stopping.is_set():
                    return
                try:
                    await broker.restart()
                    break
                except Exception as exc:
                    failures += 1
                    backoff = min(max(backoff * 2, cfg.backoff_initial_s), cfg.backoff_max_s)
                    log.error(f"{broker.name} did not start, retrying",
                              extra={"err": str(exc)[-500:], "attempt": failures,
                                     "backoff_s": backoff})
            self.broker_restarts += 1
            started = time.monotonic()
            self.broker_down.clear()
            log.warning(f"{broker.name} restarted",
                        extra={"pid": broker.pid, "restarts": self.broker_restarts,
                               "down_s": round(started - died, 2)})

    async def stop(self) -> None:
        """SIGTERM in reverse start order, each given stop_timeout_s, then SIGKILL."""
        self.stopping.set()
        for child in reversed(list(self.children.values())):
            proc = child.proc
            if proc is None or proc.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.config.stop_timeout_s)
            except TimeoutError:
                log.error("child ignored SIGTERM, killing", extra={"child": child.spec.name})
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            log.info("stopped", extra={"child": child.spec.name, "exit_code": proc.returncode})


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]


def child_env(base: dict[str, str] | None = None, /, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in (base or os.environ).items()
           if not k.startswith("MENDERS_NATS_PASSWORD_")}
    env.update(extra)
    return env
