"""Run every benchmark, one after the other, and summarise their goals.

    python bench/run_all.py [--only NAME ...]

Each benchmark runs as its own process (its own nats-server and actors) with a
bound of BENCH_TIMEOUT_S; its JSON lands in bench/results/<name>.json as usual.
This writes bench/results/summary.json: per benchmark its headline number, its
goal and whether it was met, and prints the same object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCH_TIMEOUT_S = 170.0


def _runtime_goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    ratios, goals = r["ratios"], r["goals"]
    tp = ratios["throughput_runtime_over_raw"]
    out = [{"goal": "runtime throughput >= 0.8x raw", "value": tp,
            "met": tp >= goals["throughput_ratio_at_least"]}]
    for q in ("p50", "p99"):
        v = ratios[f"hop_{q}_runtime_over_raw"]
        out.append({"goal": f"hop latency {q} <= 1.5x raw", "value": v,
                    "met": v <= goals["hop_ratio_at_most"]})
    return out


def _single_goal(text: str, unit: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    # The bound is the bench's own (`goal.at_most`): a label here cannot drift from it.
    def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
        g = r["goal"]
        return [{"goal": f"{text} <= {g['at_most']:g} {unit}", "metric": g["metric"],
                 "value": g["value"], "met": g["met"]}]
    return goals


BENCHES: dict[str, tuple[list[str], Callable[[dict[str, Any]], list[dict[str, Any]]]]] = {
    "runtime_vs_raw": ([], _runtime_goals),
    "control_plane": ([], _single_goal("incident opened -> execution started p99", "ms")),
    "kill_switch": ([], _single_goal("kill engaged -> every executor stopped p99", "ms")),
    "detection": ([], _single_goal(
        "fault injected -> incident opened, minus for_s (1 s scrape),", "s")),
}


def run(name: str, extra: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    path = RESULTS / f"{name}.json"
    before = path.stat().st_mtime if path.exists() else 0.0
    try:
        proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *extra],
                              capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
                              env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {BENCH_TIMEOUT_S:g}s"}
    elapsed = round(time.monotonic() - started, 1)
    if proc.returncode != 0 or not path.exists() or path.stat().st_mtime <= before:
        return {"ok": False, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-2000:],
                "elapsed_s": elapsed}
    return {"ok": True, "result": json.loads(path.read_text()), "elapsed_s": elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--only", action="append", choices=list(BENCHES))
    args = p.parse_args()
    summary: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "cpus": os.cpu_count(), "benches": {}}
    for name in args.only or list(BENCHES):
        extra, goals = BENCHES[name]
        print(f"run_all: {name} ...", file=sys.stderr, flush=True)
        out = run(name, extra)
        if out["ok"]:
            entry: dict[str, Any] = {"goals": goals(out["result"]),
                                     "elapsed_s": out["elapsed_s"],
                                     "loadavg_at_start": out["result"].get("machine", {})
                                     .get("loadavg_at_start")}
        else:
            entry = {"error": out["error"], "stderr": out.get("stderr", ""),
                     "goals": [{"goal": "ran", "met": False}]}
        entry["all_met"] = all(g["met"] for g in entry["goals"])
        summary["benches"][name] = entry
    summary["all_met"] = all(b["all_met"] for b in summary["benches"].values())
    text = json.dumps(summary, indent=2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "summary.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
