"""`menders audit`: timelines, the incident list and chain verification.

Reads the SQLite file directly through a read-only connection, so it works
with or without NATS and the auditor running, and can never alter the record.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import msgspec

from actors.auditor.store import AuditError, AuditStore, Record, default_path
from actors.runtime.config import Config
from bus_schemas import codec, render

EXIT_OK, EXIT_FAILED = 0, 1


class _JsonRecord(msgspec.Struct):
    seq: int
    stream: str
    stream_seq: int
    bus_subject: str
    hash: str
    event: msgspec.Raw  # the exact bytes the auditor received


async def run_audit(config: Config, args: argparse.Namespace) -> int:
    path = Path(args.db) if getattr(args, "db", None) else default_path(config.home_dir)
    try:
        store = await AuditStore.open(path, readonly=True)
    except AuditError as exc:
        return _fail(f"{exc} (the auditor writes it; is `menders up` running with this home?)"
                     if "no audit database" in str(exc) else str(exc))
    try:
        if args.verify:
            return await _verify(store, args.json)
        if args.incident:
            return await _timeline(store, args.incident, args.json)
        return await _incidents(store, args.json)
    except AuditError as exc:
        return _fail(str(exc))
    except BrokenPipeError:  # `menders audit ... | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        await store.close()


def _fail(message: str) -> int:
    print(f"menders audit: {message}", file=sys.stderr)
    return EXIT_FAILED


async def _verify(store: AuditStore, as_json: bool) -> int:
    report = await store.verify()
    if as_json:
        print(msgspec.json.encode({
            "ok": report.ok, "rows": report.rows, "head_hash": report.head_hash,
            "first_bad": None if report.problem is None else {
                "seq": report.problem.seq, "event_id": report.problem.event_id,
                "what": report.problem.what},
            "missing_triggers": list(report.missing_triggers),
        }).decode())
        return EXIT_OK if report.ok else EXIT_FAILED
    if report.problem is not None:
        print(f"chain BROKEN at {report.problem} ({report.rows} rows before it verify)")
    if report.missing_triggers:
        print("append-only triggers missing: " + ", ".join(report.missing_triggers)
              + " (the file was altered outside the auditor)")
    if report.ok:
        print(f"chain OK: {report.rows} rows (head {report.head_hash[:16]}...)")
    return EXIT_OK if report.ok else EXIT_FAILED


async def _timeline(store: AuditStore, ref: str, as_json: bool) -> int:
    incident_id, records = await store.timeline(ref)
    if as_json:
        for r in records:
            print(msgspec.json.encode(_JsonRecord(r.seq, r.stream, r.stream_seq, r.bus_subject,
                                                  r.hash, msgspec.Raw(r.payload))).decode())
        return EXIT_OK
    print(f"incident {incident_id}: {len(records)} events")
    for r in records:
        print(_line(r))
    return EXIT_OK


def _line(r: Record) -> str:
    try:
        return render.line(r.event(), r.bus_subject)
    except codec.DecodeError:  # recorded by a newer schema than this CLI knows
        return f"#{r.seq} {r.kind} {r.bus_subject}: {r.payload[:200].decode(errors='replace')}"


async def _incidents(store: AuditStore, as_json: bool) -> int:
    found = await store.incidents(20)
    if as_json:
        for inc in found:
            print(msgspec.json.encode(inc).decode())
        return EXIT_OK
    if not found:
        print(f"no incidents recorded in {store.path} ({await store.count()} rows)")
        return EXIT_OK
    print(f"{'incident':<32}  {'subject':<12} {'invariant':<24} {'opened':<19}  outcome")
    for inc in found:
        opened = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(inc.opened))
        print(f"{inc.incident_id:<32}  {inc.subject:<12} {inc.invariant:<24} {opened:<19}  "
              f"{inc.outcome} ({inc.events} events)")
    return EXIT_OK
