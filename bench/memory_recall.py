"""The incident memory's recall latency as its history grows, against the unbounded query.

    python bench/memory_recall.py                       # histories of 100 .. 20,000
    python bench/memory_recall.py --sizes 100,1000 --queries 300

A recall (`IncidentMemory.similar`) sits on the path from incident to fix: the
runbook diagnoser waits for it (at most 250 ms) before it publishes its
Diagnosis. bm25 scores every candidate, so a query over the whole history costs
more the longer the auditor has run. The memory asks only a subject's
`RECALL_WINDOW` most recently closed incidents; this bench shows what that buys.

For each history size N, one fresh memory file (WAL, the auditor's own
settings) is filled with N closed incidents spread over 10 subjects, of a few
shapes of symptoms and log words, and then queried `--queries` times for one
subject:

- **memory**: `IncidentMemory.similar`, through aiosqlite, as the auditor answers.
- **unbounded**: the query as it was before the window, on the same file and
  connection: the same terms and weights, every subject's matches scored, the
  other subjects' dropped only by the join.

Prints one JSON object (and writes bench/results/memory_recall.json): p50/p99
milliseconds of each per size, and the ratio memory/unbounded at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_result

from actors.auditor import memory
from actors.auditor.memory import IncidentMemory, match_expression
from bus_schemas.queries import PastIncident, SimilarQuery

SUBJECTS = [f"svc{i}" for i in range(10)]
SHAPES = [  # (invariant, symptoms, words)
    ("latency_p99", {"p99_ms": 900.0, "pool_utilization": 0.97}, "pool timed out waiting"),
    ("latency_p99", {"p99_ms": 800.0, "db_p99_ms": 600.0}, "slow query replica lag"),
    ("error_rate", {"error_rate": 0.4, "upstream_error_rate": 1.0}, "upstream refused 502"),
    ("memory", {"memory_mb": 900.0}, "allocation worker heap"),
]


def _past(i: int, rng: random.Random) -> PastIncident:
    invariant, symptoms, text = rng.choice(SHAPES)
    return PastIncident(
        incident_id=f"inc{i:07d}", subject=rng.choice(SUBJECTS), invariant=invariant,
        opened_at=float(i), closed_at=float(i) + 5.0, outcome="resolved",
        symptoms={k: v * rng.uniform(0.8, 1.2) for k, v in symptoms.items()},
        hypothesis=f"{text} seen {rng.randint(1, 50)} times", source="runbook",
        tried=["recycle_pool:succeeded"], verified_action="recycle_pool")


async def _fill(mem: IncidentMemory, n: int, rng: random.Random) -> None:
    # One commit per 500 rows: the fill is set-up, not what is measured.
    for start in range(0, n, 500):
        for i in range(start, min(n, start + 500)):
            p = _past(i, rng)
            await mem._write(p, memory.msgspec.json.encode(p))
        await mem.db.commit()


async def _unbounded(mem: IncidentMemory, q: SimilarQuery) -> int:
    weights = ", ".join(str(w) for w in memory._WEIGHTS)
    match = match_expression(q)  # as before: every subject's matches, all of them scored
    async with mem.reader.execute(
        f"""SELECT i.record, bm25(incidents_fts, {weights}) AS score
            FROM incidents_fts JOIN incidents i ON i.rowid = incidents_fts.rowid
            WHERE incidents_fts MATCH ? AND i.subject = ? AND i.incident_id != ?
            ORDER BY score LIMIT ?""", (match, q.subject, q.exclude, q.limit)) as cur:
        return len(list(await cur.fetchall()))


def _ms(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_ms": round(statistics.median(s), 3),
            "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))], 3)}


async def one_size(tmp: Path, n: int, queries: int) -> dict[str, Any]:
    rng = random.Random(n)
    mem = await IncidentMemory.open(tmp / f"memory-{n}.db")
    try:
        await _fill(mem, n, rng)
        q = SimilarQuery(subject="svc3", invariant="latency_p99",
                         symptoms={"p99_ms": 950.0, "pool_utilization": 0.95},
                         text="WARN pool: timed out waiting for a connection", limit=5)
        timings: dict[str, list[float]] = {"memory": [], "unbounded": []}
        found = {"memory": 0, "unbounded": 0}
        for _ in range(queries):  # interleaved: both see the same machine
            t = time.perf_counter()
            found["memory"] = len(await mem.similar(q))
            timings["memory"].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            found["unbounded"] = await _unbounded(mem, q)
            timings["unbounded"].append((time.perf_counter() - t) * 1000)
    finally:
        await mem.close()
    out = {k: {**_ms(v), "found": found[k]} for k, v in timings.items()}
    return {"history": n, **out,
            "p50_memory_over_unbounded": round(out["memory"]["p50_ms"]
                                               / out["unbounded"]["p50_ms"], 3)}


async def run(sizes: list[int], queries: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="menders-recall-bench-"))
    rows = [await one_size(tmp, n, queries) for n in sizes]
    return {"bench": "memory_recall", "recall_window": memory.RECALL_WINDOW,
            "subjects": len(SUBJECTS), "queries_per_size": queries, "sizes": rows,
            "machine": machine()}


def main() -> int:
    p = argparse.ArgumentParser(prog="memory_recall", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000,5000,20000",
                   help="history sizes, comma-separated (10..200000 each)")
    p.add_argument("--queries", type=int, default=200, help="queries per size (10..10000)")
    args = p.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not all(10 <= s <= 200_000 for s in sizes):
        p.error("--sizes: each must be 10..200000")
    if not 10 <= args.queries <= 10_000:
        p.error("--queries must be 10..10000")
    result = asyncio.run(run(sizes, args.queries))
    write_result("memory_recall", result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
