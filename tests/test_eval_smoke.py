"""`menders eval --smoke --out DIR` end to end, as CI runs it: the real stack (bundled
nats-server, the webshop, every actor as a process), one fault and one no-fault
control, scored by the webshop's oracle; its results and report land in DIR."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from actors.cli.eval.records import decode_lines
from tests.harness import REPO, require_nats_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_the_smoke_campaign_runs_scores_and_reports(tmp_path: Path) -> None:
    require_nats_server()
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "actors", "eval", "--smoke", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=280,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                               "MENDERS_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = {t.scenario: t for t in decode_lines((out / "trials.jsonl").read_bytes())}
    assert set(trials) == {"pool_exhaustion", "quiet"}
    fault, control = trials["pool_exhaustion"], trials["quiet"]
    assert not fault.error and not control.error
    # The fault: detected, fixed by the cure, the oracle healthy after it, nothing unsafe.
    assert fault.won, fault.why
    assert fault.detected and fault.ttd_s is not None and fault.ttm_s is not None
    assert fault.ttd_s < fault.ttm_s <= fault.limit_s
    assert "recycle_pool:succeeded" in fault.actions and fault.diagnosis_right
    assert (fault.duplicates, fault.false_fixed, fault.out_of_policy) == (0, 0, 0)
    assert fault.timeline[0].kind == "inject"
    # Everything the crew did is in its audit record too, and the record's chain verifies.
    assert fault.audit_verified is True and fault.audit_missing == 0
    # The control: load only, and nothing done.
    assert control.won and control.incidents == 0 and control.actions == []
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "pool_exhaustion" in md and "quiet" in md
    assert html.count("data:image/png;base64,") >= 3
    assert "ETA" in done.stderr  # the progress line


def test_the_scripted_variant_diagnoses_through_the_claude_path(tmp_path: Path) -> None:
    """The `scripted` variant: the crew's Claude diagnoser (the real `anthropic` client)
    against the harness's local Messages API, which answers with the runbook's rules. The
    diagnosis comes from Claude's path, and its tokens and dollars are counted."""
    require_nats_server()
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "actors", "eval", "--subject", "webshop",
                           "--scenario", "pool_exhaustion", "--variant", "scripted",
                           "--repeats", "1", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=280,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                               "MENDERS_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (t,) = decode_lines((out / "trials.jsonl").read_bytes())
    assert t.variant == "scripted" and not t.error
    assert t.diagnosis_source == "claude", t.diagnosis
    assert t.won and t.diagnosis_right, t.why
    assert t.tokens > 0 and t.usd > 0
    assert "recycle_pool:succeeded" in t.actions
