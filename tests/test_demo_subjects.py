"""`menders demo --subject ratelimiter|kvcluster`, end to end: the whole crew as real
processes against real redis-server and etcd, each subject's fault catalog run once,
its final table read back row by row.

One demo run per subject (CI time): each run injects every fault of the catalog,
so it covers symptom -> detection -> diagnosis -> the governed fix -> verification
(or the escalation of the unfixable fault) for all of them.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.harness import REPO, require_binary, require_nats_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(330)]

RUN_TIMEOUT_S = 300  # a catalog takes about 100 s (ratelimiter) and 130 s (kvcluster)

# kvcluster faults whose repair waits on work not landed yet: asserted when it lands.
PENDING = {
    # NOSPACE is a plan of five steps (compact -> defragment m1, m2, m3 one at a time ->
    # disarm); until the planner builds multi-step plans it tries one action per attempt
    # and the alarm stands.
    "nospace": "needs multi-step plans (compact -> defrag each member -> disarm)",
    # The runbook rule member_lost_its_data needs etcd's "no such file or directory"
    # among the incident's log lines, but the panic line comes ~2 s before the incident
    # opens (for_s) and the incident carries only the last scrape's new lines; the fresh
    # look for attempt 2 then averages members_down over 5 s (0.6, not ==1), so no rule
    # matches and the incident escalates after restart_member is refused.
    "data_dir_removed": "the diagnosis misses etcd's last log line (incident log window) "
                        "and the fresh look's mean of members_down",
}


@dataclass
class Row:
    fault: str
    detected_after: str
    diagnosis: str
    actions: str
    verified_after: str
    outcome: str


def demo_command(subject: str) -> list[str]:
    """`python -m actors demo --subject S --quiet`; the demo module's own entry point
    (the same run_demo) while the CLI's parser does not yet take --subject."""
    from actors.cli.main import build_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["demo", "--subject", subject])
        entry = ["-m", "actors", "demo"]
    except SystemExit:
        entry = ["-m", "actors.cli.demo"]
    return [sys.executable, *entry, "--subject", subject, "--quiet"]


def run_demo(subject: str) -> tuple[int, dict[str, Row], str]:
    require_nats_server()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MENDERS_") and k != "ANTHROPIC_API_KEY"}
    out = subprocess.run(demo_command(subject), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=RUN_TIMEOUT_S)
    print(out.stdout[-6000:])
    return out.returncode, table_of(out.stdout), out.stdout + out.stderr[-3000:]


def table_of(stdout: str) -> dict[str, Row]:
    """The final table, cut at the columns its dashes line marks."""
    lines = stdout.splitlines()
    start = max(i for i, ln in enumerate(lines) if ln.startswith("fault ") and
                "outcome" in ln)
    dashes = lines[start + 1]
    spans, pos = [], 0
    for width in (len(d) for d in dashes.split("  ")):
        spans.append((pos, pos + width))
        pos += width + 2
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in spans[:-1]] + [line[spans[-1][0]:].strip()]
        rows[cells[0]] = Row(*cells)
    return rows


def check(rows: dict[str, Row], expected: dict[str, tuple[str, str]], out: str,
          pending: tuple[str, ...] = ()) -> None:
    """expected: fault -> (outcome, the action that must have succeeded, or ""); the
    `pending` faults must have a row, whatever it says."""
    assert set(rows) == set(expected) | set(pending), out[-4000:]
    for fault, (outcome, action) in expected.items():
        row = rows[fault]
        assert row.outcome == outcome, (fault, row, out[-4000:])
        assert row.detected_after != "-", (fault, row)
        assert row.diagnosis != "-", (fault, row)
        if outcome == "remediated":
            assert f"{action}:succeeded" in row.actions, (fault, row)
            assert row.verified_after != "-", (fault, row)
        else:
            assert row.verified_after == "-", (fault, row)


def test_demo_ratelimiter_remediates_every_fault_and_escalates_corrupted_data() -> None:
    require_binary("redis-server", "redis-server")
    code, rows, out = run_demo("ratelimiter")
    check(rows, {
        "node_killed": ("remediated", "restart_node"),
        "redis_link_cut": ("remediated", "reconnect_node"),
        "redis_slow": ("remediated", "failover_redis"),
        "counters_without_ttl": ("remediated", "repair_counters"),
        "bad_build": ("remediated", "rollback_build"),
        "local_store": ("remediated", "reconnect_node"),
        "primary_killed": ("remediated", "failover_redis"),
        "data_corrupted": ("escalated", ""),
    }, out)
    assert code == 0, out[-4000:]
    assert "every fault handled as expected" in out


def test_demo_kvcluster_restarts_members_and_escalates_a_lost_quorum() -> None:
    require_binary("etcd", "etcd-server")
    code, rows, out = run_demo("kvcluster")
    check(rows, {
        "member_killed": ("remediated", "restart_member"),
        "member_hung": ("remediated", "restart_member"),
        "quorum_lost": ("escalated", ""),
    }, out, tuple(PENDING))
    pending = {f: why for f, why in PENDING.items()
               if f not in rows or rows[f].outcome != "remediated"}
    assert code == (1 if pending else 0), out[-4000:]
    if pending:  # strict=False: passes once the work they wait on has landed
        pytest.xfail("; ".join(f"{f}: {why}" for f, why in pending.items()))
