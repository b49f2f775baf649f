"""The embedded cluster as `menders up` runs it: `python -m subjects.kvcluster serve`.

Config in, observer and action client out of the definition (as the monitor and
the executor build them), a fault through the chaos port, and SIGTERM stopping
every member the launcher started.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from subjects.kvcluster.definition import DEFINITION
from subjects.kvcluster.layout import LOADGEN_PORT_OFFSET, Layout, free_port
from tests.test_kvcluster import require_etcd

pytestmark = pytest.mark.e2e


def free_base_port() -> int:
    """A base port with the 7 ports after it free (members' client/peer, load metrics)."""
    for _ in range(50):
        base = free_port()
        if base + LOADGEN_PORT_OFFSET > 65535:
            continue
        try:
            socks = []
            for port in range(base, base + LOADGEN_PORT_OFFSET + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no 7 consecutive free ports")


class Cfg:
    def __init__(self, url: str, cluster_dir: Path) -> None:
        self.url = url
        self.options: dict[str, Any] = {"cluster_dir": str(cluster_dir)}


async def _until(observer: Any, pred: Any, within_s: float, what: str) -> dict[str, float]:
    deadline = time.monotonic() + within_s
    while True:
        obs = await observer.scrape()
        if pred(obs["metrics"]):
            return dict(obs["metrics"])
        assert time.monotonic() < deadline, f"{what} not seen: {obs}"
        await asyncio.sleep(0.5)


@dataclass
class Served:
    base: int
    chaos_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    require_etcd()
    base, chaos_port = free_base_port(), free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "subjects.kvcluster", "serve", "--port", str(base),
             "--chaos-port", str(chaos_port), "--data-dir", str(tmp_path / "kv"),
             "--options", json.dumps({"load_rps": 30})], stdout=log, stderr=subprocess.STDOUT)
        try:
            yield Served(base, chaos_port, tmp_path / "kv", proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def stop_and_list_survivors(served: Served) -> list[int]:
    """SIGTERM the launcher; the PIDs of its members still running afterwards."""
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=20) == 0
    layout = Layout.load(served.data_dir)
    pids = [int(layout.pid_file(n).read_text()) for n in layout.names]
    # A member restarted by this test's client is its child: a zombie once stopped.
    return [p for p in pids if Path(f"/proc/{p}").exists()
            and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


async def test_the_embedded_cluster_serves_chaos_and_stops_its_members_on_sigterm(
        served: Served) -> None:
    cfg = Cfg(f"http://127.0.0.1:{served.base}", served.data_dir)
    observer = DEFINITION.make_observer(cfg)
    client = DEFINITION.make_action_client(cfg)
    try:
        m = await _until(observer, lambda m: m.get("members_up") == 3 and
                         m.get("put_p99_ms", 0) > 0, 40.0, "three members under load")
        assert m["has_leader"] == 1.0
        chaos_url = f"http://127.0.0.1:{served.chaos_port}/faults/member_killed"
        async with aiohttp.ClientSession() as http, http.post(chaos_url) as r:
            assert r.status == 200, await r.text()
        await _until(observer, lambda m: m.get("members_down") == 1, 15.0, "a member down")
        assert "healthy" in await client.run("restart_member", {}, 20.0)
        await _until(observer, lambda m: m.get("members_down") == 0, 15.0, "all back")
    finally:
        await observer.close()
        await client.close()
    assert stop_and_list_survivors(served) == []
