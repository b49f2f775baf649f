"""The audit record's sustained write rate against a raw aiosqlite insert loop, same run.

    python bench/audit_write.py                    # 3,000 rows each
    python bench/audit_write.py --rows 10000

Three writers, one after the other, each into its own fresh file in one temp
directory, all with the record's own durability (WAL, synchronous=FULL, one
commit per row: the auditor acks a message only once its row is committed):

- **raw**: aiosqlite, `INSERT` + `COMMIT` per row of the same columns and payload,
  nothing else: the floor any SQLite record pays on this disk.
- **store**: `AuditStore.append`, the record itself: BEGIN IMMEDIATE, the
  duplicate check by event id, the head read, the chained hash, the insert, the commit.
- **auditor**: the real auditor process behind a real nats-server, fed by
  JetStream: the time from the first publish until its record holds every row
  (`menders audit`'s own count), so bus, decode and ack are in it.

Prints one JSON object (and writes bench/results/audit_write.json): rows per
second of each, and the ratios store/raw and auditor/raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosqlite

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_bus, machine, subject_config, write_result

from actors.auditor.store import COLUMNS, AuditStore, default_path
from bus_schemas import catalog, codec
from bus_schemas import messages as m


def _event(i: int) -> m.IncidentOpened:
    return m.IncidentOpened(
        id=f"audit-bench-{i}", incident_id=f"inc-{i // 10}", subject="webshop",
        producer="detector", invariant="pool_saturation",
        summary="pool utilisation 0.95 >= 0.9 for 3 s", value=0.95, threshold=0.9,
        symptoms={"pool_utilization": 0.95, "error_rate": 0.01, "p99_ms": 180.0},
        recent_logs=["pool: 19/20 connections checked out"] * 3)


async def raw(path: Path, rows: int) -> float:
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=FULL")
    await db.execute(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, event_id TEXT UNIQUE, kind TEXT, "
        "incident_id TEXT, subject TEXT, producer TEXT, ts REAL, bus_subject TEXT, "
        "stream TEXT, stream_seq INTEGER, payload BLOB, prev_hash TEXT, hash TEXT)")
    started = time.perf_counter()
    for i in range(rows):
        e = _event(i)
        payload = codec.encode(e)
        await db.execute("BEGIN")
        await db.execute(f"INSERT INTO events ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (i + 1, e.id, "incident.opened", e.incident_id, e.subject,
                          e.producer, e.ts, "bus", catalog.EVENTS_STREAM, i + 1, payload,
                          "", ""))
        await db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    await db.close()
    return rows / elapsed


async def store(path: Path, rows: int) -> float:
    s = await AuditStore.open(path)
    started = time.perf_counter()
    for i in range(rows):
        e = _event(i)
        await s.append(e, codec.encode(e), bus_subject=catalog.bus_subject_of(e),
                       stream=catalog.EVENTS_STREAM, stream_seq=i + 1)
    elapsed = time.perf_counter() - started
    assert (await s.verify()).ok
    await s.close()
    return rows / elapsed


async def auditor(tmp: Path, rows: int) -> float:
    async with bench_bus(tmp, subject_config("webshop", "http://127.0.0.1:9")) as bus:
        bus.spawn("auditor")
        await bus.wait_heartbeats({"auditor": 1})
        nc = await bus.connect(catalog.ADMIN)
        js = nc.jetstream(timeout=10)
        payloads = [(catalog.bus_subject_of(e), codec.encode(e))
                    for e in (_event(i) for i in range(rows))]
        started = time.perf_counter()
        # Published as fast as acks come back (a window of in-flight publishes), as a
        # busy crew would: the record's rate, not the publisher's, is what is measured.
        window = 256
        for i in range(0, rows, window):
            await asyncio.gather(*(js.publish(s, p) for s, p in payloads[i:i + window]))
        db = default_path(bus.home)
        while True:
            count = await _count(db)
            if count >= rows:
                break
            if time.perf_counter() - started > 300:
                raise RuntimeError(f"the auditor recorded {count}/{rows} in 300 s")
            await asyncio.sleep(0.05)
        return rows / (time.perf_counter() - started)


async def _count(path: Path) -> int:
    try:  # the auditor creates the file on its first message
        s = await AuditStore.open(path, readonly=True)
    except Exception:
        return 0
    try:
        return await s.count()
    finally:
        await s.close()


async def run(rows: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="menders-audit-bench-"))
    rates = {"raw": await raw(tmp / "raw.db", rows),
             "store": await store(tmp / "store.db", rows),
             "auditor": await auditor(tmp / "bus", rows)}
    return {
        "bench": "audit_write",
        "rows": rows,
        "durability": "WAL, synchronous=FULL, one commit per row",
        "rows_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratios": {"store_over_raw": round(rates["store"] / rates["raw"], 3),
                   "auditor_over_raw": round(rates["auditor"] / rates["raw"], 3)},
        "machine": machine(),
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="audit_write", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=3000)
    args = p.parse_args()
    if not 100 <= args.rows <= 1_000_000:
        p.error("--rows must be 100..1000000")
    result = asyncio.run(run(args.rows))
    write_result("audit_write", result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
