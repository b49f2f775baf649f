"""The monitor as a real process, scraping a real webshop service."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from actors.monitor import sanitize
from bus_schemas import messages as m
from tests.harness import REPO, Bus
from tests.test_detector import webshop

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers: a hung subject."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    try:
        yield int(srv.getsockname()[1])
    finally:
        srv.close()


def start_webshop(data_dir: Path, port: int, chaos_port: int) -> subprocess.Popen[bytes]:
    with open(data_dir.parent / "webshop.out", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "subjects.webshop", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--chaos-port", str(chaos_port), "--data-dir", str(data_dir)],
            cwd=REPO, stdout=out, stderr=out, stdin=subprocess.DEVNULL)


@contextlib.asynccontextmanager
async def webshop_service(data_dir: Path) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    port, chaos_port = free_port(), free_port()
    proc = start_webshop(data_dir, port, chaos_port)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with s.get(f"{url}/health") as resp:
                        if resp.status == 200:
                            break
                assert proc.poll() is None, (data_dir.parent / "webshop.out").read_text()
                assert time.monotonic() < deadline, "the webshop did not come up"
                await asyncio.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def obs_of(col_events: list[m.Observation], subject: str, **where: bool) -> list[m.Observation]:
    return [o for o in col_events
            if o.subject == subject and all(getattr(o, k) == v for k, v in where.items())]


async def test_monitor_observes_a_real_webshop_and_reports_it_down(bus: Bus,
                                                                  tmp_path: Path) -> None:
    await webshop()
    data_dir = tmp_path / "shop"
    async with webshop_service(data_dir) as (url, proc):
        with silent_server() as hung_port:
            bus.write_config(f"""
[subjects.shop]
kind = "webshop"
url = "{url}"
log_path = "{data_dir / 'logs' / 'app.log'}"
embedded = false

[subjects.hung]
kind = "webshop"
url = "http://127.0.0.1:{hung_port}"
embedded = false
""")
            async with bus.collect("menders.obs.>") as col:
                bus.spawn("monitor")
                await col.wait_for(lambda e: isinstance(e, m.Observation)
                                   and e.subject == "shop" and e.up
                                   and "p99_ms" in e.metrics, count=4)
                await col.wait_for(lambda e: isinstance(e, m.Observation)
                                   and e.subject == "hung" and not e.up, count=2)
                proc.terminate()
                proc.wait(10)
                stopped = time.time()
                [down] = await col.wait_for(lambda e: isinstance(e, m.Observation)
                                            and e.subject == "shop" and not e.up
                                            and e.ts > stopped)
    shop = obs_of(col.events(m.Observation), "shop", up=True)
    first = shop[0]
    assert {"p99_ms", "error_rate", "memory_mb", "pool_utilization"} <= first.metrics.keys()
    assert first.producer == "monitor" and first.scrape_ms > 0
    assert any(line for o in shop for line in o.log_lines), "the app log is tailed"
    # A hung subject is a symptom, and it did not stall the healthy one's schedule.
    hung = obs_of(col.events(m.Observation), "hung")
    assert hung and not any(o.up for o in hung) and all(o.error for o in hung)
    gaps = [b.ts - a.ts for a, b in itertools.pairwise(shop)]
    assert gaps and max(gaps) < 2.5, gaps
    assert down.error and down.metrics == {}


def test_sanitize_keeps_only_finite_metrics_and_caps_logs() -> None:
    obs = sanitize("shop", 1.0, {"up": True, "metrics": {"a": 1, "b": float("nan"),
                                                         "c": "x", "d": float("inf")},
                                 "log_lines": ["x" * 10_000] * 500}, 3.0)
    assert obs.metrics == {"a": 1.0}
    assert len(obs.log_lines) == 50 and all(len(line) == 2000 for line in obs.log_lines)
    bad = sanitize("shop", 1.0, {"up": True, "metrics": "garbage", "log_lines": None}, 1.0)
    assert bad.metrics == {} and bad.log_lines == []
