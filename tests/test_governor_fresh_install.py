"""A fresh install is closed: `menders up` with no [governor] config waits for a human.

`menders up` runs as a real process (its own nats-server, every actor supervised);
the only config is where to listen and the managed subject, which points at the
recording action server, so "nothing executed" is counted at the receiving end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest

from actors.runtime import credentials
from actors.stack.natsserver import free_port
from bus_schemas import catalog, codec
from bus_schemas import messages as m
from bus_schemas.natsconf import inbox_prefix
from tests.harness import REPO, Collector, RecordingServer, plan_of, require_nats_server, step

pytestmark = pytest.mark.e2e


class FreshUp:
    def __init__(self, tmp: Path, action_url: str) -> None:
        self.home = tmp / "home"
        self.home.mkdir()
        self.config = tmp / "menders.toml"
        # No [governor] section: the governor runs on its shipped defaults.
        self.config.write_text(
            f"[nats]\nport = {free_port()}\n"
            "[runtime]\nmetrics_base_port = 0\nheartbeat_s = 0.5\n"
            f'[subjects.shop]\nkind = "webshop"\nurl = "{action_url}"\nembedded = false\n')
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MENDERS_")}
        self.env["MENDERS_HOME"] = str(self.home)
        self.proc: subprocess.Popen[str] | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "actors", "--config", str(self.config),
                               *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=30)

    def popen(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors", "--config", str(self.config), "up",
             "--no-subjects"], env=self.env, cwd=REPO, stdout=subprocess.PIPE,
            stderr=open(self.home / "up.log", "w"), text=True)

    async def start(self) -> None:
        await asyncio.to_thread(self.popen)
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        assert "ready" in line, (self.home / "up.log").read_text()[-3000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    async def connect(self, user: str) -> nats.NATS:
        return await nats.connect(credentials.url_from(self.home, ""), user=user,
                                  password=credentials.password_for(user, self.home),
                                  inbox_prefix=inbox_prefix(user))


@contextlib.asynccontextmanager
async def fresh_up(tmp: Path, actions: RecordingServer) -> AsyncIterator[FreshUp]:
    require_nats_server()
    up = FreshUp(tmp, actions.url)
    try:
        await up.start()
        yield up
    finally:
        up.stop()


async def test_a_fresh_install_is_in_approve_mode_and_runs_nothing_until_a_human_approves(
        tmp_path: Path, actions: RecordingServer) -> None:
    async with fresh_up(tmp_path, actions) as up:
        st = await asyncio.to_thread(up.cli, "status", "--json")
        assert json.loads(st.stdout)["mode"] == "approve", st.stderr
        text = await asyncio.to_thread(up.cli, "status")
        assert "mode: approve" in text.stdout
        operator = await up.connect(catalog.OPERATOR)
        planner = await up.connect("planner")
        col = Collector()
        await operator.subscribe(catalog.EVERYTHING, cb=col.on_msg)
        try:
            # A low-risk, registered, idempotent step: the kind policy would release at
            # once in execute mode.
            plan = msgspec.structs.replace(plan_of(step("enable_cache")), producer="planner")
            await planner.jetstream().publish(catalog.bus_subject_of(plan), codec.encode(plan),
                                              headers={"Nats-Msg-Id": plan.id})
            [waiting] = await col.wait_for(lambda e: isinstance(e, m.Decision)
                                           and e.plan_id == plan.plan_id)
            assert waiting.outcome == "awaiting_approval"
            assert "approve mode: a human must approve" in waiting.reason
            # The governor decided (the Decision is its last word on the plan) and
            # released nothing: no approval exists for any executor to act on.
            assert not col.events(m.ExecutionApproved) and actions.count() == 0
            out = await asyncio.to_thread(up.cli, "approve", waiting.execution_id,
                                          "--by", "alice")
            assert out.returncode == 0, out.stderr
            [approved] = await col.wait_for(lambda e: isinstance(e, m.ExecutionApproved))
            assert approved.approved_by == "alice"
            [res] = await col.wait_for(lambda e: isinstance(e, m.ExecutionResult))
            assert res.status == "succeeded" and actions.count("enable_cache") == 1
        finally:
            await operator.close()
            await planner.close()
