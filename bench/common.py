"""What the control-loop benchmarks share: a real nats-server, real actor processes,
a recording HTTP action endpoint, percentiles and the result file.

Everything runs on loopback in a temp directory; every process started here is
stopped here, by its own handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from aiohttp import web
from nats.aio.client import Client

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from actors.runtime import credentials  # noqa: E402
from actors.runtime.publish import publish_event  # noqa: E402
from actors.stack import provision  # noqa: E402
from actors.stack.natsserver import EmbeddedNats  # noqa: E402
from bus_schemas import catalog, codec  # noqa: E402
from bus_schemas import messages as m  # noqa: E402
from bus_schemas.natsconf import inbox_prefix, password_env  # noqa: E402


def machine() -> dict[str, Any]:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": load}


def runtime_section(*, metrics: bool = False, log_level: str = "WARNING",
                    extra: str = "") -> str:
    """A bench's [runtime]: quiet logs; metrics ports off, or on (each actor a free port:
    the benches set MENDERS_METRICS_PORT=0) where a bench reads them; `extra` lines."""
    return (f"[runtime]\nmetrics_base_port = {9464 if metrics else 0}\n"
            f'log_level = "{log_level}"\n{extra}\n')


def subject_config(subject: str, url: str, *, embedded: bool = False, extra: str = "",
                   metrics: bool = False) -> str:
    """A bench's TOML config: `runtime_section`, one webshop-kind subject at `url`.

    `extra` is inserted as whole sections (e.g. a [governor] block); for an embedded
    subject the scrape runs every second, as in the demo.
    """
    scrape = "scrape_interval_s = 1.0\n" if embedded else ""
    return (f"{runtime_section(metrics=metrics)}{extra}"
            f'[subjects.{subject}]\nkind = "webshop"\nurl = "{url}"\n{scrape}'
            f"embedded = {'true' if embedded else 'false'}\n")


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile of an unsorted list (the same rule as runtime_vs_raw)."""
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def summary_ms(xs_s: list[float]) -> dict[str, float | int]:
    """p50/p90/p99/max/mean in milliseconds of a list of seconds."""
    if not xs_s:
        return {"n": 0}
    return {"n": len(xs_s),
            "p50_ms": round(pct(xs_s, 50) * 1000, 3),
            "p90_ms": round(pct(xs_s, 90) * 1000, 3),
            "p99_ms": round(pct(xs_s, 99) * 1000, 3),
            "max_ms": round(max(xs_s) * 1000, 3),
            "mean_ms": round(sum(xs_s) / len(xs_s) * 1000, 3)}


def write_result(name: str, result: dict[str, Any]) -> str:
    text = json.dumps(result, indent=2)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{name}.json").write_text(text + "\n")
    return text


# --- the bus ----------------------------------------------------------------------------


@dataclass
class BenchBus:
    server: EmbeddedNats
    home: Path
    passwords: dict[str, str]
    config_path: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    async def connect(self, user: str) -> Client:
        nc = await nats.connect(self.url, user=user, password=self.passwords[user],
                                inbox_prefix=inbox_prefix(user), connect_timeout=5)
        self.clients.append(nc)
        return nc

    def spawn(self, actor: str, tag: str = "") -> subprocess.Popen[bytes]:
        """`menders run <actor>` as its own process, with only its own credentials."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MENDERS_")}
        env.update(MENDERS_NATS_URL=self.url, MENDERS_HOME=str(self.home),
                   MENDERS_CONFIG=str(self.config_path), MENDERS_METRICS_PORT="0",
                   PYTHONPATH=str(REPO))
        env[password_env(actor)] = self.passwords[actor]
        log = open(self.home / f"{actor}{tag}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "actors", "run", actor], env=env,
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO)
        log.close()
        self.procs.append(proc)
        return proc

    async def wait_heartbeats(self, actors: dict[str, int], timeout: float = 30.0) -> None:
        """Until each actor name has sent heartbeats from `count` distinct pids."""
        nc = await self.connect(catalog.OPERATOR)
        seen: dict[str, set[int]] = {a: set() for a in actors}
        done = asyncio.Event()
        since = time.time()

        async def on_beat(msg: Any) -> None:
            beat = codec.decode(msg.data, (m.Heartbeat,))
            if isinstance(beat, m.Heartbeat) and beat.actor in seen and beat.ts >= since - 1:
                seen[beat.actor].add(beat.pid)
                if all(len(seen[a]) >= n for a, n in actors.items()):
                    done.set()

        sub = await nc.subscribe(catalog.under("heartbeat"), cb=on_beat)
        try:
            deadline = time.monotonic() + timeout
            while not done.is_set():
                dead = [p.args for p in self.procs if p.poll() is not None]
                if dead:  # a config error ends an actor at once: say so, do not wait it out
                    raise RuntimeError(f"actor exited: {dead}; logs in {self.home}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"actors not ready: {seen}; logs in {self.home}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.5)
        finally:
            await sub.unsubscribe()

    async def publish(self, nc: Client, event: m.Event, user: str) -> None:
        await publish_event(nc.jetstream(timeout=10), event, user)

    async def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.to_thread(p.wait, 10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for nc in self.clients:
            with contextlib.suppress(Exception):
                await nc.close()
        self.server.stop()


@contextlib.asynccontextmanager
async def bench_bus(tmp: Path, config: str) -> AsyncIterator[BenchBus]:
    """A provisioned nats-server in `tmp`, and the config file every actor reads."""
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    passwords = credentials.generate()
    server = EmbeddedNats(tmp / "nats", passwords)
    await server.start()
    cfg = home / "menders.toml"
    cfg.write_text(config)
    bus = BenchBus(server, home, passwords, cfg)
    try:
        admin = await bus.connect(catalog.ADMIN)
        await provision.provision(admin.jetstream(timeout=10))
        yield bus
    finally:
        await bus.close()


# --- a recording action endpoint ------------------------------------------------------------


@dataclass
class Recorder:
    """POST /actions/<name>: answers like the webshop's action endpoints, records each call.

    `block` makes every call hang until the client goes away (a long execution).
    """

    block: bool = False
    url: str = ""
    calls: list[tuple[float, str]] = field(default_factory=list)
    on_call: Callable[[], None] | None = None
    _runner: web.AppRunner | None = None

    async def _action(self, request: web.Request) -> web.Response:
        self.calls.append((time.time(), request.match_info["name"]))
        if self.on_call is not None:
            self.on_call()
        if self.block:
            await asyncio.sleep(3600)
        return web.json_response({"ok": True, "detail": "recorded"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/actions/{name}", self._action)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
