"""`menders up` and its supervisor, as real processes: ready, status, metrics, restarts,
no orphans, and giving up loudly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.runtime.config import SupervisorConfig
from actors.stack.natsserver import free_port
from actors.stack.supervisor import ChildSpec, GaveUp, Supervisor, child_env
from bus_schemas import catalog
from tests.harness import REPO, require_binary, require_nats_server

pytestmark = pytest.mark.e2e  # `menders up` and supervised children: processes


def free_port_range(n: int) -> int:
    """A base port with n free ports after it (actor i serves base + i)."""
    for _ in range(50):
        base = free_port()
        if base + n >= 65535:
            continue
        if all(_bindable(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port range")


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pids_with_home(home: Path) -> set[int]:
    """Every live process whose environment or command line names this test's home."""
    needle = str(home).encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is dead, only not yet reaped
            if needle in (entry / "environ").read_bytes() or needle in (
                    entry / "cmdline").read_bytes():
                found.add(int(entry.name))
    return found


@dataclass
class Up:
    home: Path
    config: Path
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "actors", "--config", str(self.config),
                               *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def popen_up(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "actors", "--config", str(self.config),
                                 "up", "--no-subjects", *args], env=self.env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=open(self.home / "up.log", "w"),
                                text=True)

    def status(self) -> dict[str, dict[str, object]]:
        out = self.cli("status", "--json")
        assert out.returncode in (0, 1), out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    require_nats_server()
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "menders.toml"
    config.write_text(
        f"[nats]\nport = {free_port()}\n"
        f"[runtime]\nmetrics_base_port = {free_port_range(len(catalog.ACTORS))}\n"
        "heartbeat_s = 0.5\n"
        "[supervisor]\nbackoff_initial_s = 0.2\nstop_timeout_s = 10\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MENDERS_")}
    env["MENDERS_HOME"] = str(home)
    yield Up(home, config, env)
    for pid in pids_with_home(home):  # whatever a failed test left behind, by PID
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_ready(proc: subprocess.Popen[str], up: Up) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "ready" in line, (line, (up.home / "up.log").read_text()[-3000:])
    return line


def eventually_status(up: Up, ok: object, within: float = 30) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + within
    while True:
        st = up.status()
        if ok(st):  # type: ignore[operator]
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"status never matched: {json.dumps(st)[:3000]}")
        time.sleep(0.2)


def all_alive(st: dict[str, dict[str, object]]) -> bool:
    actors = st["actors"]
    return len(actors) == len(catalog.ACTORS) and all(
        a["alive"] for a in actors.values())  # type: ignore[index]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_ready_only_prints_ready_and_leaves_nothing_behind(up: Up) -> None:
    proc = up.popen_up("--ready-only")
    line = wait_ready(proc, up)
    assert f"{len(catalog.ACTORS)} actors" in line
    assert proc.wait(30) == 0
    assert pids_with_home(up.home) == set()


def test_up_supervises_restarts_and_stops_without_orphans(up: Up) -> None:
    proc = up.popen_up()
    try:
        wait_ready(proc, up)
        st = eventually_status(up, all_alive)
        actors: dict[str, dict[str, int]] = st["actors"]  # type: ignore[assignment]
        pids = {name: int(a["pid"]) for name, a in actors.items()}
        assert all(alive(p) for p in pids.values())

        # Every actor serves valid Prometheus text on its own port.
        ports = {name: int(a["metrics_port"]) for name, a in actors.items()}
        assert len(set(ports.values())) == len(catalog.ACTORS)
        for name, port in ports.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                families = {f.name for f in text_string_to_metric_families(r.read().decode())}
            assert "menders_messages_handled" in families, name

        tail = up.cli("tail", "--count", "5", catalog.under("heartbeat"), "--seconds", "20")
        assert tail.returncode == 0, tail.stderr
        beats = [ln for ln in tail.stdout.splitlines() if "heartbeat" in ln]
        assert len(beats) == 5, tail.stdout

        # SIGKILL one actor: the supervisor restarts it alone.
        victim = "planner"
        os.kill(pids[victim], signal.SIGKILL)
        st = eventually_status(
            up, lambda s: s["actors"][victim]["alive"]  # type: ignore[index]
            and s["actors"][victim]["pid"] != pids[victim])  # type: ignore[index]
        new_pid = int(st["actors"][victim]["pid"])  # type: ignore[index,call-overload]
        assert alive(new_pid)
        for name, pid in pids.items():
            if name != victim:
                assert st["actors"][name]["pid"] == pid, name  # type: ignore[index]
        pids[victim] = new_pid
        ours = pids_with_home(up.home)
        assert set(pids.values()) <= ours
        assert len(ours) > len(pids)  # the nats-server (and the supervisor) too
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, (up.home / "up.log").read_text()[-3000:]
    assert not any(alive(p) for p in pids.values())
    assert pids_with_home(up.home) == set(), "orphans left behind"


# --- the Supervisor itself ----------------------------------------------------------


def counting_child(tmp: Path, name: str, code: str) -> ChildSpec:
    runs = tmp / f"{name}.runs"
    script = (f"import os, sys; open({str(runs)!r}, 'a').write(f'{{os.getpid()}}\\n'); "
              + code)
    return ChildSpec(name, [sys.executable, "-c", script], child_env())


def runs_of(tmp: Path, name: str) -> list[int]:
    path = tmp / f"{name}.runs"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("max_restarts", [0, 1, 3])
async def test_a_child_that_keeps_dying_makes_the_supervisor_give_up(
        tmp_path: Path, max_restarts: int) -> None:
    spec = counting_child(tmp_path, "crasher", "sys.exit(3)")
    sup = Supervisor([spec], SupervisorConfig(max_restarts=max_restarts, max_seconds=60,
                                              backoff_initial_s=0.01, backoff_max_s=0.05))
    await sup.start()
    with pytest.raises(GaveUp, match=r"crasher died .* \(last exit code 3\); giving up"):
        await asyncio.wait_for(sup.watch(), 30)
    assert len(runs_of(tmp_path, "crasher")) == max_restarts + 1
    assert sup.gave_up and sup.stopping.is_set()
    await sup.stop()


async def test_one_for_one_only_the_dead_child_is_restarted(tmp_path: Path) -> None:
    flag = tmp_path / "crashed-once"
    crash_once = (f"import pathlib, time; p = pathlib.Path({str(flag)!r})\n"
                  "if not p.exists(): p.touch(); sys.exit(1)\n"
                  "time.sleep(60)")
    crasher = counting_child(tmp_path, "crasher", crash_once)
    steady = counting_child(tmp_path, "steady", "import time; time.sleep(60)")
    sup = Supervisor([steady, crasher], SupervisorConfig(max_restarts=3, backoff_initial_s=0.01,
                                                         stop_timeout_s=5))
    await sup.start()
    watch = asyncio.ensure_future(sup.watch())
    try:
        deadline = time.monotonic() + 20
        while len(runs_of(tmp_path, "crasher")) < 2:
            assert time.monotonic() < deadline, "crasher was not restarted"
            assert not watch.done(), watch
            await asyncio.sleep(0.05)
        assert len(runs_of(tmp_path, "steady")) == 1
        assert sup.pids()["crasher"] == runs_of(tmp_path, "crasher")[-1]
    finally:
        await sup.stop()
        watch.cancel()
    for child in sup.children.values():
        assert child.proc is not None and child.proc.returncode is not None


async def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = counting_child(
        tmp_path, "stubborn",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)")
    stubborn.log_path = str(tmp_path / "stubborn.log")
    sup = Supervisor([stubborn], SupervisorConfig(stop_timeout_s=0.5))
    await sup.start()
    log = tmp_path / "stubborn.log"
    deadline = time.monotonic() + 20
    while "ready" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await sup.stop()
    proc = sup.children["stubborn"].proc
    assert proc is not None and proc.returncode == -signal.SIGKILL


# --- what the supervisor never gives up on: a managed subject, the broker -----------------


async def test_a_keep_trying_child_is_restarted_for_ever_and_the_crew_stays(
        tmp_path: Path) -> None:
    """A managed subject in a crash loop is restarted with a capped backoff, never given
    up on, while a crew child beside it that dies once is restarted alone."""
    subject = counting_child(tmp_path, "subject", "sys.exit(3)")
    subject.keep_trying, subject.role = True, "subject"
    flag = tmp_path / "actor-crashed"
    # The actor dies once, while the subject is backing off: restarted at once regardless.
    actor = counting_child(tmp_path, "actor", (
        f"import pathlib, time; p = pathlib.Path({str(flag)!r})\n"
        "if not p.exists(): p.touch(); time.sleep(0.3); sys.exit(1)\n"
        "time.sleep(60)"))
    sup = Supervisor([subject, actor], SupervisorConfig(
        max_restarts=1, max_seconds=60, backoff_initial_s=0.01, backoff_max_s=0.2,
        stop_timeout_s=5))
    await sup.start()
    watch = asyncio.ensure_future(sup.watch())
    try:
        deadline = time.monotonic() + 30
        while len(runs_of(tmp_path, "subject")) < 8:  # far beyond max_restarts = 1
            assert time.monotonic() < deadline, runs_of(tmp_path, "subject")
            assert not watch.done(), watch
            await asyncio.sleep(0.05)
        assert not sup.gave_up and not sup.stopping.is_set()
        assert sup.children["subject"].backoff_s == 0.2  # doubled up to its cap
        assert len(runs_of(tmp_path, "actor")) == 2  # died once, restarted once, alone
    finally:
        await sup.stop()
        watch.cancel()


class FakeBroker:
    """A Restartable: any process the supervisor must keep alive beside the children."""

    name = "fake-broker"

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def restart(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import time; time.sleep(60)")
        self.starts += 1

    async def wait_exit(self) -> int | None:
        assert self.proc is not None
        return await self.proc.wait()


async def test_a_dead_broker_is_restarted_without_bound(tmp_path: Path) -> None:
    steady = counting_child(tmp_path, "steady", "import time; time.sleep(60)")
    broker = FakeBroker()
    await broker.restart()
    sup = Supervisor([steady], SupervisorConfig(max_restarts=1, max_seconds=60,
                                                backoff_initial_s=0.01, backoff_max_s=0.05,
                                                stop_timeout_s=5), broker=broker)
    await sup.start()
    watch = asyncio.ensure_future(sup.watch())
    try:
        for n in range(1, 5):  # more deaths than any child would be allowed
            pid = broker.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while sup.broker_restarts < n:
                assert time.monotonic() < deadline and not watch.done(), watch
                await asyncio.sleep(0.02)
            assert broker.pid != pid and not sup.broker_down.is_set()
        assert broker.starts == 5 and not sup.gave_up
        assert runs_of(tmp_path, "steady") == [sup.pids()["steady"]]
    finally:
        await sup.stop()
        watch.cancel()
        if broker.proc and broker.proc.returncode is None:
            broker.proc.kill()
            await broker.proc.wait()


# --- any mix of subjects --------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """pid and every live process below it (a subject's redis-servers, nodes, etcd members)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.name.isdigit():
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def _kv_base_port() -> int:
    """The first of 7 consecutive free ports: an embedded etcd cluster's members and load."""
    for _ in range(50):
        base = free_port()
        if base + 7 < 65535 and all(_bindable(base + i) for i in range(7)):
            return base
    raise RuntimeError("no 7 consecutive free ports")


@pytest.mark.timeout(150)
async def test_up_starts_and_observes_a_mix_of_subjects_and_stops_them_all(
        tmp_path: Path) -> None:
    """One config, three embedded subjects of three kinds (real redis-server and etcd
    under them) and one someone else runs: each embedded one is started, supervised and
    observed up, the outside one only observed (down: nobody answers there), and a stop
    leaves no process behind."""
    import nats

    from actors.runtime.config import load
    from actors.stack.up import Stack
    from bus_schemas import codec
    from bus_schemas import messages as m
    from bus_schemas.natsconf import inbox_prefix

    require_nats_server()
    require_binary("redis-server", "redis-server")
    require_binary("etcd", "etcd-server")
    home = tmp_path / "home"
    cfg = tmp_path / "menders.toml"
    cfg.write_text(f"""\
home = "{home}"
[nats]
port = {free_port()}
[runtime]
metrics_base_port = 0
[supervisor]
stop_timeout_s = 15
[subjects.shop]
url = "http://127.0.0.1:{free_port()}"
[subjects.limits]
kind = "ratelimiter"
url = "http://127.0.0.1:{free_port()}"
[subjects.limits.options]
nodes = 2
[subjects.kv]
kind = "kvcluster"
url = "http://127.0.0.1:{_kv_base_port()}"
[subjects.kv.options]
load_rps = 10
[subjects.outside]
url = "http://127.0.0.1:{free_port()}"
embedded = false
""")
    stack = Stack(load(cfg), str(cfg), actors=("monitor",), child_logs=True)
    embedded = ("shop", "limits", "kv")
    seen: dict[str, set[bool]] = {}
    outside_seen = asyncio.Event()
    try:
        await stack.start()
        assert stack.supervisor is not None
        pids = stack.supervisor.pids()
        assert set(pids) == {"monitor", *(f"subject:{n}" for n in embedded)}
        assert set(json.loads((home / "chaos.json").read_text())) == set(embedded)
        nc = await nats.connect(stack.url, user=catalog.OPERATOR,
                                password=stack.passwords[catalog.OPERATOR],
                                inbox_prefix=inbox_prefix(catalog.OPERATOR))

        async def on_obs(msg: object) -> None:
            obs = codec.decode(msg.data, (m.Observation,))  # type: ignore[attr-defined]
            assert isinstance(obs, m.Observation)
            seen.setdefault(obs.subject, set()).add(obs.up)
            if obs.subject == "outside":
                outside_seen.set()

        await nc.subscribe(catalog.under("obs"), cb=on_obs)
        watch = asyncio.ensure_future(stack.supervisor.watch())
        try:
            up_after = await stack.wait_observed(embedded, timeout=90)
            await asyncio.wait_for(outside_seen.wait(), 10)
        finally:
            await nc.close()
            assert not watch.done(), watch  # nothing gave up
            watch.cancel()
        assert seen.get("outside") == {False}, seen
        rss = {n: _rss_kib(_descendants(pids[f"subject:{n}"])) for n in embedded}
        print(f"\nobserved up after {up_after}; RSS KiB with children: {rss}")
        below = {n: len(_descendants(pids[f"subject:{n}"])) for n in embedded}
        # the manager with its redis-servers and nodes; the launcher with 3 etcd members
        assert below["limits"] >= 1 + 2 + 2 and below["kv"] >= 1 + 3, below
    finally:
        await stack.stop()
    assert pids_with_home(home) == set(), "left behind"
