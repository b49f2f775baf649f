"""`menders up` outlives its dependencies, as real processes (issue 9, item 6).

- The embedded nats-server SIGKILLed: `menders up` reaps it (no zombie), starts
  it again on the same port with the same store, and no actor crashes (the same
  PIDs throughout); `menders status` answers again and the loop still runs end
  to end (a fault on the webshop still gets an ExecutionStarted).
- The managed subject crash-looping (killed more than max_restarts times within
  max_seconds): it is an incident for the crew, never a reason to stop it; the
  actors keep their PIDs, `menders up` keeps running, the subject keeps being
  restarted with a growing backoff.

Every wait is for an observable event (a new PID, a heartbeat, an event on the
bus), bounded by a deadline; the tests end only the processes they started, by
PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.aio.client import Client

from actors.stack.natsserver import free_port
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.natsconf import inbox_prefix
from tests.harness import REPO, require_nats_server, until

pytestmark = pytest.mark.e2e

SHOP = "webshop"


def _free_port_range(n: int) -> int:
    import socket

    for _ in range(50):
        base = free_port()
        if base + n >= 65535:
            continue
        ok = True
        for i in range(n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + i))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone (reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _children(ppid: int, needle: str) -> list[int]:
    """Live (not zombie) children of `ppid` whose command line contains `needle`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is None or st[1] != ppid or st[0] == "Z":
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace"):
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _nats_port(pid: int) -> str | None:
    """The -p argument of a nats-server process (None before its exec)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        argv = _cmdline(pid)
        if "-p" in argv and "nats-server" in argv[0]:
            return argv[argv.index("-p") + 1]
    return None


def _pids_with_home(home: Path) -> set[int]:
    needle = str(home).encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            st = _stat(int(entry.name))
            if st is None or st[0] == "Z":
                continue
            if needle in (entry / "environ").read_bytes() or needle in (
                    entry / "cmdline").read_bytes():
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


@dataclass
class Up:
    home: Path
    config: Path
    env: dict[str, str]
    nats_port: int
    shop_port: int
    metrics_base: int
    proc: subprocess.Popen[str] | None = None

    def write_config(self, backoff_initial_s: float, publish_timeout_s: float) -> None:
        home = self.home
        self.config.write_text(f"""\
home = "{home}"

[nats]
port = {self.nats_port}

[runtime]
metrics_base_port = {self.metrics_base}
heartbeat_s = 0.5
publish_timeout_s = {publish_timeout_s}

[supervisor]
max_restarts = 2
max_seconds = 60
backoff_initial_s = {backoff_initial_s}
backoff_max_s = 3.2
stop_timeout_s = 10

[governor]
mode = "execute"
allow = {{ {SHOP} = ["*"] }}
approval_above = "medium"
max_per_subject_per_minute = 20
max_per_minute = 40

[subjects.{SHOP}]
url = "http://127.0.0.1:{self.shop_port}"
scrape_interval_s = 0.5
""")

    @property
    def log(self) -> str:
        path = self.home / "up.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_records(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def start(self, *, backoff_initial_s: float = 0.2, publish_timeout_s: float = 5.0) -> str:
        self.write_config(backoff_initial_s, publish_timeout_s)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors", "--config", str(self.config), "up",
             "--child-logs"], env=self.env, cwd=REPO, stdout=subprocess.PIPE,
            stderr=open(self.home / "up.log", "w"), text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "ready" in line, (line, self.log[-3000:])
        return line

    async def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "actors", "--config", str(self.config), *args,
            env=self.env, cwd=REPO, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())

    async def status(self) -> dict[str, dict[str, object]] | None:
        """`menders status --json`, or None while it cannot answer."""
        out = await self.cli("status", "--json")
        if out.returncode not in (0, 1) or not out.stdout.strip().startswith("{"):
            return None
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    async def actor_pids(self, within: float = 60) -> dict[str, int]:
        """Every actor's PID from its heartbeat, once all are alive."""
        last: dict[str, object] = {}

        async def check() -> dict[str, int] | None:
            st = await self.status()
            if st is None:
                return None
            last.update(st)
            actors = st["actors"]
            if len(actors) == len(catalog.ACTORS) and all(
                    a["alive"] for a in actors.values()):  # type: ignore[index]
                return {n: int(a["pid"]) for n, a in actors.items()}  # type: ignore[index,call-overload]
            return None

        deadline = time.monotonic() + within
        while True:
            got = await check()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"status never showed every actor alive: "
                                     f"{json.dumps(last, default=str)[:2000]}\n{self.log[-3000:]}")
            await asyncio.sleep(0.2)

    async def operator(self) -> Client:
        creds = json.loads((self.home / "credentials.json").read_text())
        return await nats.connect(creds["url"], user=catalog.OPERATOR,
                                  password=creds["passwords"][catalog.OPERATOR],
                                  inbox_prefix=inbox_prefix(catalog.OPERATOR),
                                  max_reconnect_attempts=-1, reconnect_time_wait=0.2)

    def chaos_url(self) -> str:
        return str(json.loads((self.home / "chaos.json").read_text())[SHOP])


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    require_nats_server()
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "menders.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDERS_")}
    env["MENDERS_HOME"] = str(home)
    u = Up(home, config, env, free_port(), free_port(), _free_port_range(len(catalog.ACTORS)))
    try:
        yield u
    finally:
        if u.proc is not None and u.proc.poll() is None:
            u.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                u.proc.wait(60)
        for pid in _pids_with_home(home):  # whatever a failed test left behind, by PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def collecting(nc: Client, pattern: str) -> AsyncIterator[list[m.Event]]:
    seen: list[m.Event] = []

    async def on_msg(msg: object) -> None:
        with contextlib.suppress(codec.DecodeError):
            seen.append(codec.decode(msg.data))  # type: ignore[attr-defined]

    sub = await nc.subscribe(pattern, cb=on_msg)
    try:
        yield seen
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def _nats_pid(up: Up) -> int | None:
    assert up.proc is not None
    found = _children(up.proc.pid, "nats-server")
    return found[0] if len(found) == 1 else None


def _shop_pid(up: Up) -> int | None:
    assert up.proc is not None
    found = _children(up.proc.pid, f"subjects.{SHOP} serve")
    return found[0] if len(found) == 1 else None


@pytest.mark.timeout(240)
async def test_a_killed_nats_server_is_restarted_and_no_actor_crashes(up: Up) -> None:
    # The broker stays down for the first backoff (3 s), longer than a KV request's
    # timeout (1.5 s): every actor's KV calls fail for a while, as in a real outage.
    up.start(backoff_initial_s=3.0, publish_timeout_s=1.5)
    pids = await up.actor_pids()
    assert up.proc is not None
    old = _nats_pid(up)
    assert old is not None, "no embedded nats-server under menders up"
    port = _nats_port(old)
    assert port

    os.kill(old, signal.SIGKILL)
    # Reaped at once (no zombie left), and a new server on the same port, same store.
    await until("the dead nats-server reaped", lambda: _stat(old) is None, 10,
                 lambda: f"still {_stat(old)}\n{up.log[-3000:]}")
    new = await until("a new nats-server",
                       lambda: (p := _nats_pid(up)) and p != old and _nats_port(p) and p,
                       30, lambda: up.log[-3000:])
    assert isinstance(new, int)
    assert _nats_port(new) == port  # the same port, so every client's URL still holds
    assert up.proc.poll() is None, up.log[-3000:]
    assert "nats-server died, restarting" in up.log, up.log[-3000:]

    # Every actor rode through: status answers again, every actor alive, the same PIDs.
    after = await up.actor_pids(within=60)
    assert after == pids, (after, pids, up.log[-3000:])
    assert all(_alive(p) for p in pids.values())

    # The crew still works end to end after the broker restart.
    nc = await up.operator()
    try:
        async with collecting(nc, catalog.EVERYTHING) as seen:
            t0 = time.time()
            async with aiohttp.ClientSession() as s, s.post(
                    f"{up.chaos_url()}/faults/bad_config",
                    timeout=aiohttp.ClientTimeout(total=10)) as resp:
                assert resp.status == 200, await resp.text()
            await until(
                "an ExecutionStarted on the webshop after the broker restart",
                lambda: [e for e in seen if isinstance(e, m.ExecutionStarted)
                         and e.subject == SHOP and e.ts >= t0], 90,
                lambda: str(sorted({type(e).__name__ for e in seen})) + up.log[-2000:])
    finally:
        await nc.close()
    assert await up.actor_pids() == pids
    # The restart was logged once, not once per second.
    died = [r for r in up.log_records() if r.get("msg") == "nats-server died, restarting"]
    assert len(died) == 1, up.log[-3000:]


@pytest.mark.timeout(240)
async def test_a_crash_looping_subject_is_an_incident_not_a_reason_to_stop_the_crew(
        up: Up) -> None:
    up.start()
    pids = await up.actor_pids()
    assert up.proc is not None
    nc = await up.operator()
    kills = 5  # max_restarts = 2 within max_seconds = 60: the old rule gave up at the 3rd
    try:
        async with collecting(nc, catalog.EVERYTHING) as seen:
            for _ in range(kills):
                victim = await until("the webshop running", lambda: _shop_pid(up), 30,
                                      lambda: up.log[-3000:])
                assert isinstance(victim, int)
                os.kill(victim, signal.SIGKILL)
                await until("the dead webshop reaped", lambda v=victim: _stat(v) is None, 10)
                assert up.proc.poll() is None, up.log[-3000:]
            # Still restarted after more deaths than the crew's give-up rule allows.
            await until("the webshop restarted again", lambda: _shop_pid(up), 30,
                         lambda: up.log[-3000:])
            # Down long enough (the backoff grew): the crew sees an incident on it.
            await until(
                "an incident opened on the webshop",
                lambda: [e for e in seen if isinstance(e, m.IncidentOpened)
                         and e.subject == SHOP], 60,
                lambda: str(sorted({type(e).__name__ for e in seen})))
    finally:
        await nc.close()
    assert up.proc.poll() is None, up.log[-3000:]
    assert await up.actor_pids() == pids
    # One log line per restart, with a growing backoff.
    backoffs = [float(r["backoff_s"]) for r in up.log_records()
                if r.get("msg") == "subject died, restarting"]
    assert len(backoffs) == kills, up.log[-3000:]
    assert backoffs == sorted(backoffs) and backoffs[-1] > backoffs[0], backoffs
