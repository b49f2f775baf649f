"""`menders up`: one OS process per child, restarted one-for-one with backoff.

Like an OTP supervisor: a child that dies is restarted alone, after an
exponential backoff; more than `max_restarts` restarts within `max_seconds`
and the supervisor gives up loudly, stopping everything. Children start in
order (consumers before producers) and stop in reverse order. Each child is
its own session (Ctrl-C reaches only the supervisor, which stops them in
order) and dies with the supervisor (PR_SET_PDEATHSIG), so none is orphaned.
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


@dataclass
class Child:
    spec: ChildSpec
    proc: asyncio.subprocess.Process | None = None
    restarts: deque[float] = field(default_factory=deque)
    started_at: float = 0.0
    backoff_s: float = 0.0


class GaveUp(MendersError, RuntimeError):
    pass


class Supervisor:
    def __init__(self, specs: list[ChildSpec], config: SupervisorConfig) -> None:
        self.config = config
        self.children = {s.name: Child(s) for s in specs}
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
        """Restart children as they die, until stopped or given up."""
        waits = {
            asyncio.ensure_future(c.proc.wait()): c
            for c in self.children.values()
            if c.proc is not None
        }
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                done, _ = await asyncio.wait({*waits, stop}, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    if fut is stop:
                        continue
                    child = waits.pop(fut)
                    if self.stopping.is_set():
                        continue
                    await self._restart(child)
                    assert child.proc is not None
                    waits[asyncio.ensure_future(child.proc.wait())] = child
        finally:
            stop.cancel()
            for fut in waits:
                fut.cancel()

    async def _restart(self, child: Child) -> None:
        assert child.proc is not None
        code = child.proc.returncode
        now = time.monotonic()
        child.restarts.append(now)
        while child.restarts and now - child.restarts[0] > self.config.max_seconds:
            child.restarts.popleft()
        if len(child.restarts) > self.config.max_restarts:
            self.gave_up = (
                f"{child.spec.name} died {len(child.restarts)} times within "
                f"{self.config.max_seconds:g}s (last exit code {code}); giving up"
            )
            log.error("giving up", extra={"child": child.spec.name, "exit_code": code})
            self.stopping.set()
            raise GaveUp(self.gave_up)
        # A child that ran a while healthy starts its backoff over.
        if now - child.started_at > self.config.max_seconds:
            child.backoff_s = 0.0
        child.backoff_s = min(
            max(child.backoff_s * 2, self.config.backoff_initial_s), self.config.backoff_max_s
        )
        log.warning(
            "child died, restarting",
            extra={"child": child.spec.name, "exit_code": code, "backoff_s": child.backoff_s},
        )
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), child.backoff_s)
        if not self.stopping.is_set():
            await self._spawn(child)

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
