"""The whole crew on a 3-node cluster, the MENDERS_EVENTS leader SIGKILLed mid-incident.

    python bench/cluster_failover.py --runs 3

Runs the e2e test that does it for real (tests/test_cluster.py::
test_crew_on_a_cluster_ends_an_incident_when_the_events_leader_dies_mid_incident: three
nats-server nodes from the committed configs, R3 streams and buckets, `menders up
--nats-url` with all three URLs, a webshop pool_exhaustion, the leader killed when the
plan is on the bus) `--runs` times, each in its own pytest process, and collects the
line each prints: which node died, how long after the plan, the time from the kill to
the incident's resolution, effects at the subject against approvals, and every event
after the plan with its time from the kill. Prints one JSON object and writes
bench/results/cluster_failover.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, pct, write_result

TEST = ("tests/test_cluster.py::"
        "test_crew_on_a_cluster_ends_an_incident_when_the_events_leader_dies_mid_incident")
MARK = "cluster-failover: "


def one() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           TEST], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        return {"passed": False, "tail": proc.stdout[-1500:]}
    return {"passed": True, **json.loads(lines[-1][len(MARK):])}


def main() -> int:
    p = argparse.ArgumentParser(prog="cluster_failover", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if args.runs < 1:
        p.error("--runs must be at least 1")
    runs = []
    for _ in range(args.runs):
        runs.append(one())
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    recovered = [r["resolved_after_kill_s"] for r in runs if r["passed"]]
    result = {"bench": "cluster_failover", "runs": runs,
              "passed": sum(r["passed"] for r in runs), "of": len(runs),
              "resolved_after_kill_s": {"p50": pct(recovered, 50), "max": max(recovered)}
              if recovered else {}, "machine": machine()}
    write_result("cluster_failover", result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return 0 if result["passed"] == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
