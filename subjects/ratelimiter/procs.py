"""A small process manager: start children, record their PIDs, end only those, by PID.

The ratelimiter's redis-servers and limiter nodes are separate OS processes
(a node can really be SIGKILLed). Each child gets PR_SET_PDEATHSIG, so a
killed manager leaves no orphans; `pids.json` in the data directory names
what runs now. In production the same roles are systemd units
(docs/architecture.md, "subjects/ratelimiter").
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class ProcessManager:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.exits: dict[str, int] = {}  # name -> return code of its last exit, once reaped

    def start(self, name: str, argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        if self.alive(name):
            raise RuntimeError(f"{name} is already running (pid {self.procs[name].pid})")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                    start_new_session=True)
        self.procs[name] = proc
        self.exits.pop(name, None)
        self._record()
        return proc

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    def reap(self) -> dict[str, int]:
        """Children that exited since the last call: name -> return code."""
        gone = {}
        for name, proc in self.procs.items():
            rc = proc.poll()
            if rc is not None and name not in self.exits:
                self.exits[name] = gone[name] = rc
        if gone:
            self._record()
        return gone

    def signal(self, name: str, sig: int) -> None:
        """Send `sig` to a child this manager started, by its PID."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            raise ProcessLookupError(f"{name} is not running")
        os.kill(proc.pid, sig)

    def stop(self, name: str, timeout_s: float = 3.0) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
        self.reap()

    def kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def _record(self) -> None:
        pids = {n: p.pid for n, p in self.procs.items() if p.poll() is None}
        path = self.data_dir / "pids.json"
        path.write_text(json.dumps(pids, indent=1))


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Blocking: until `port` accepts connections or `proc` exits; False on exit or timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(port):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False
