"""The webshop faults end to end with the Claude diagnoser against the fake API.

`python -m actors demo --fault <fault> --llm` as a real process: the bundled
nats-server, the real webshop under load, every actor its own process, with
ANTHROPIC_API_KEY set and `[llm] base_url` pointing at the fake. The fake is
the scripted `GoodSre` of tests/fake_anthropic.py: it calls the investigation
tools, then applies a hand-written rule table (the webshop runbooks'
knowledge, written independently) to the symptoms it reads in the prompt and
the tool answers. So this proves the plumbing (prompt, tools over the bus,
forced diagnosis, validation, plan, governor, execution, verdict) with a
model that reasons correctly; it says nothing about how well a real Claude
diagnoses.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.fake_anthropic import GoodSre, fake_anthropic, is_summary
from tests.harness import REPO, require_nats_server

pytestmark = pytest.mark.e2e


async def run_demo(tmp: Path, base_url: str, *args: str, key: str = "test",
                   timeout: float = 150) -> tuple[int, str]:
    cfg = tmp / "user.toml"
    cfg.write_text(f'[llm]\nbase_url = "{base_url}"\nmax_retries = 1\nretry_attempts = 0\n'
                   "timeout_s = 5.0\nmax_wall_s = 20.0\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MENDERS_", "ANTHROPIC_"))}
    env["MENDERS_CONFIG"] = str(cfg)
    if key:
        env["ANTHROPIC_API_KEY"] = key
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "actors", "demo", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.timeout(300)
async def test_webshop_faults_are_handled_with_the_claude_diagnoser(tmp_path: Path) -> None:
    """Three faults, one demo run: a leak and a bad config (read from the logs the model
    asked for) remediated, upstream_down escalated. Every fault with the runbooks is
    test_e2e_loop's; the eval's scripted variant runs Claude's path over any scenario."""
    require_nats_server()
    sre = GoodSre()
    faults = [a for f in (*FIXABLE, "upstream_down") for a in ("--fault", f)]
    async with fake_anthropic(sre) as fake:
        code, out = await run_demo(tmp_path, fake.url, "--llm", "--quiet", *faults,
                                   timeout=280)
    assert code == 0, out[-4000:]  # the demo's own verdict: every fault as expected
    assert "--llm: diagnosing with Claude (claude-sonnet-4-6 at http://127.0.0.1:" in out
    rows = {line.split()[0]: line for line in out.splitlines()
            if line.split() and line.split()[0] in (*FIXABLE, "upstream_down")}
    for fault in FIXABLE:
        assert rows[fault].rstrip().endswith("remediated"), rows[fault]
    assert rows["upstream_down"].rstrip().endswith("escalated"), rows["upstream_down"]
    by_source = next(line for line in out.splitlines() if line.startswith("diagnoses by source"))
    assert "claude" in by_source and "runbook" not in by_source, by_source
    investigations = [b for b in fake.requests if not is_summary(b)]
    assert investigations and all(b["model"] == "claude-sonnet-4-6" for b in investigations)
    # It investigated over the bus: the monitor answered the observation query.
    assert any('"points":[' in str(b["messages"]) for b in investigations)


FIXABLE = ("pool_exhaustion", "bad_config")


async def test_demo_llm_says_clearly_when_it_cannot_use_claude(tmp_path: Path) -> None:
    require_nats_server()
    async with fake_anthropic(GoodSre()) as fake:
        code, out = await run_demo(tmp_path, fake.url, "--fault", "pool_exhaustion", "--llm",
                                   key="")
    assert "--llm: cannot use Claude: ANTHROPIC_API_KEY is not set" in out
    assert "diagnoses by source: runbook 1" in out and code == 0, out[-3000:]
    assert fake.requests == []
