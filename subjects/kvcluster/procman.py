"""A small local process manager for the members: start, stop, signal, by recorded PID.

It ends only processes it started: every PID is written to the member's pid file
at start, and before any signal the PID is checked against /proc (its command
line must carry this member's data dir), so a reused PID is never signalled.
In production the same calls map to systemd units (`etcd@<member>.service`:
start/stop/restart, `systemctl kill --signal=...`); see the package README.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from bus_schemas.errors import MendersError
from subjects.kvcluster.layout import Layout

STOP_GRACE_S = 5.0


class ProcessError(MendersError, RuntimeError):
    pass


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _state(pid: int) -> str:
    """The /proc state letter: R, S, T (stopped), Z (zombie), ... ; "" when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


class LocalProcessManager:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def pid(self, name: str) -> int | None:
        """The member's live PID, if the process this manager recorded still runs."""
        self._reap()
        try:
            pid = int(self.layout.pid_file(name).read_text())
        except (OSError, ValueError):
            return None
        child = self._children.get(pid)
        if child is not None:  # ours for sure (between fork and exec /proc shows python)
            return pid if child.poll() is None else None
        argv = _cmdline(pid)
        ours = "--data-dir" in argv and str(self.layout.data_dir(name)) in argv
        return pid if ours and _state(pid) not in ("", "Z") else None

    def running(self, name: str) -> bool:
        return self.pid(name) is not None

    def stopped(self, name: str) -> bool:
        """Whether the member's process is SIGSTOPped (hung)."""
        pid = self.pid(name)
        return pid is not None and _state(pid) in ("T", "t")

    def start(self, name: str, state: str = "existing", initial: str | None = None) -> int:
        """Start a member (its data dir created if missing); the PID, recorded."""
        if (pid := self.pid(name)) is not None:
            raise ProcessError(f"{name} already runs (pid {pid})")
        self.layout.data_dir(name).mkdir(parents=True, exist_ok=True)
        log = self.layout.log_file(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.layout.pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            # Its own session: a signal to whoever started it does not reach the member.
            proc = subprocess.Popen(self.layout.etcd_argv(name, state, initial),
                                    stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._children[proc.pid] = proc
        self.layout.pid_file(name).write_text(str(proc.pid))
        return proc.pid

    def signal(self, name: str, sig: signal.Signals) -> int:
        pid = self.pid(name)
        if pid is None:
            raise ProcessError(f"{name} is not running")
        os.kill(pid, sig)
        return pid

    def stop(self, name: str, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM (and SIGCONT, so a stopped member sees it), then SIGKILL after grace_s."""
        pid = self.pid(name)
        if pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while self.pid(name) is not None:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + grace_s
            time.sleep(0.05)

    def _reap(self) -> None:
        for proc in list(self._children.values()):
            proc.poll()

    def stop_all(self) -> None:
        for name in self.layout.names:
            self.stop(name)
