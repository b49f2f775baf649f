"""The `menders` command line as a user meets it: exit codes and clear messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.stack.natsserver import free_port
from bus_schemas import catalog
from bus_schemas.natsconf import password_env
from tests.harness import REPO, Bus

pytestmark = pytest.mark.e2e  # every test runs `menders` as a process


def menders(*args: str, env: dict[str, str] | None = None,
            home: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MENDERS_")}
    if home is not None:
        base["MENDERS_HOME"] = str(home)
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "actors", *args], env=base, cwd=REPO,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--bogus", "status"], "unrecognized arguments: --bogus"),
        (["status", "--nope"], "unrecognized arguments: --nope"),
        (["run", "nobody"], "invalid choice: 'nobody'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["mode", "yolo"], "invalid choice: 'yolo'"),
        (["tail", "--count", "many"], "invalid int value: 'many'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_usage_exits_2_with_a_clear_message(tmp_path: Path, args: list[str],
                                                says: str) -> None:
    out = menders(*args, home=tmp_path)
    assert out.returncode == 2
    assert says in out.stderr


def test_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "menders.toml"
    cfg.write_text('[nats]\nport = "four"\n')
    out = menders("--config", str(cfg), "status", home=tmp_path)
    assert out.returncode == 2
    assert "$.nats.port" in out.stderr and str(cfg) in out.stderr


def test_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    out = menders("--config", str(tmp_path / "nope.toml"), "status", home=tmp_path)
    assert out.returncode == 2
    assert "cannot read config" in out.stderr


@pytest.mark.parametrize("command", [["status"], ["kill"], ["tail", "--count", "1"],
                                     ["approve", "x1"]])
def test_no_nats_reachable_exits_3_saying_where(tmp_path: Path, command: list[str]) -> None:
    port = free_port()  # nothing listens here
    env = {"MENDERS_NATS_URL": f"nats://127.0.0.1:{port}",
           password_env(catalog.OPERATOR): "irrelevant"}
    out = menders(*command, env=env, home=tmp_path)
    assert out.returncode == 3, out.stderr
    assert f"cannot connect to NATS at nats://127.0.0.1:{port}" in out.stderr


def test_no_credentials_exits_3_saying_how_to_get_them(tmp_path: Path) -> None:
    out = menders("status", home=tmp_path)
    assert out.returncode == 3
    assert password_env(catalog.OPERATOR) in out.stderr and "menders up" in out.stderr


def test_run_without_credentials_exits_3(tmp_path: Path) -> None:
    out = menders("run", "planner", home=tmp_path)
    assert out.returncode == 3
    assert password_env("planner") in out.stderr


def test_kill_then_status_shows_the_kill_switch_engaged(bus: Bus) -> None:
    env = {"MENDERS_NATS_URL": bus.url,
           password_env(catalog.OPERATOR): bus.passwords[catalog.OPERATOR]}
    # No governor runs: the operator writes the flag itself, so a kill never waits on one.
    out = menders("kill", "--by", "alice", "--reason", "drill", env=env, home=bus.home)
    assert out.returncode == 0, out.stderr
    assert "ENGAGED" in out.stdout
    st = menders("status", "--json", env=env, home=bus.home)
    assert st.returncode == 1  # no actor is running, and status says so
    status = json.loads(st.stdout)
    assert status["kill"]["engaged"] is True
    assert status["kill"]["by"] == "alice" and status["kill"]["reason"] == "drill"
    assert not any(a["alive"] for a in status["actors"].values())
    text = menders("status", env=env, home=bus.home)
    assert "kill switch: ENGAGED by alice: drill" in text.stdout
    assert "DEAD   (never seen)" in text.stdout
