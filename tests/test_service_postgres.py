"""A PostgreSQL in menders' charge with no Python written for it: deploy/examples/postgres.toml.

Real servers throughout (tests/pgstack.py): Debian's postgresql, watched by a real
prometheus-postgres-exporter and a real Prometheus (the example's PromQL), with a real
prometheus-alertmanager firing the example's alert rule at the monitor's webhook
receiver; the whole crew runs as real processes on a real nats-server, diagnosing
with the TOML runbooks. Only the ports and paths of the example are rewritten.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.stack.natsserver import free_port
from bus_schemas import catalog
from bus_schemas import messages as m
from tests.harness import Bus, Collector, rmtree, start_bus, start_crew
from tests.pgstack import IdleInTransaction, PgStack

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
CREW = ("auditor", "monitor", "detector", "diagnoser", "planner", "governor", "executor",
        "verifier")
SUBJECT = "pg"


@pytest.fixture(scope="module")
def receiver_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(receiver_port: int) -> Iterator[PgStack]:
    rules = (EXAMPLES / "postgres-alerts.yml").read_text()
    with PgStack(rules=rules, webhook_url=f"http://127.0.0.1:{receiver_port}/alertmanager"
                 ) as pg:
        yield pg


def example_config(pg: PgStack, receiver_port: int) -> str:
    """The example, pointed at this test's servers; nothing else changes."""
    text = (EXAMPLES / "postgres.toml").read_text()
    for old, new in (("127.0.0.1:9090", pg.prometheus_url.removeprefix("http://")),
                     ("127.0.0.1:9187", pg.exporter_url.removeprefix("http://")),
                     ("127.0.0.1:5432", f"127.0.0.1:{pg.pg_port}"),
                     ("127.0.0.1:9095", f"127.0.0.1:{receiver_port}"),
                     ("/var/log/postgresql/postgresql-15-main.log", str(pg.pg_log))):
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.fixture
async def crew(stack: PgStack, receiver_port: int, tmp_path: Path) -> AsyncIterator[Bus]:
    bus = await start_bus(tmp_path)
    try:
        bus.write_config(example_config(stack, receiver_port))
        await start_crew(bus, *CREW)
        yield bus
    finally:
        await bus.close()
        rmtree(tmp_path / "nats")


def of_pg(kind: type[m.Event]) -> Any:
    return lambda e: isinstance(e, kind) and e.subject == SUBJECT


async def healthy(col: Collector, within: float = 30.0) -> None:
    """A fresh observation from Prometheus showing the headroom back."""
    since = time.time()
    await col.wait_for(lambda e: of_pg(m.Observation)(e) and e.ts > since and e.up
                       and e.metrics.get("pg_up") == 1
                       and e.metrics.get("connection_use", 1) < 0.5, within)


async def test_postgres_idle_in_transaction_hoarding_is_fixed_once_with_its_alert(
        stack: PgStack, crew: Bus) -> None:
    chaos = IdleInTransaction(stack)
    async with crew.collect(catalog.EVERYTHING) as col:
        await healthy(col)
        t0 = time.time()
        try:
            hoarders = chaos.start()
            assert chaos.refusal, "the fault must exhaust the slots clients can use"
            assert stack.try_connect("app") is not None  # new clients are refused
            opened = (await col.wait_for(of_pg(m.IncidentOpened), 30))[0]
            assert opened.invariant == "connection_headroom"
            diagnosis = (await col.wait_for(of_pg(m.Diagnosis), 30))[0]
            assert diagnosis.source == "runbook" and "idle" in diagnosis.hypothesis
            result = (await col.wait_for(
                lambda e: of_pg(m.ExecutionResult)(e) and e.status == "succeeded", 40))[0]
            assert result.action == "terminate_idle_in_transaction"
            assert result.detail.startswith("psql exited 0: ")  # psql's own count follows
            verdict = (await col.wait_for(of_pg(m.Verdict), 60))[0]
            assert verdict.passed, verdict.reason
            fixed_after = verdict.ts - t0
            # The alert on the same condition reached the monitor and was folded into
            # the incident already open: it held it open until it resolved too.
            await col.wait_for(lambda e: of_pg(m.Observation)(e) and e.metrics.get(
                "alert:PostgresIdleInTransactionHoarding", 0) >= 1, 30)
            resolved = (await col.wait_for(of_pg(m.IncidentResolved), 60))[0]
            assert resolved.incident_id == opened.incident_id
            assert chaos.alive() == 0 and stack.try_connect("app") is None
        finally:
            chaos.stop()
        await healthy(col)
        incidents = [e for e in col.events(m.IncidentOpened) if e.subject == SUBJECT]
        assert [e.incident_id for e in incidents] == [opened.incident_id]  # once, not twice
        runs = [e for e in col.events(m.ExecutionStarted) if e.subject == SUBJECT]
        assert len(runs) == 1
    print(f"\npostgres: fault -> incident {opened.ts - t0:.1f}s, -> fix succeeded "
          f"{result.ts - t0:.1f}s, -> verdict passed {fixed_after:.1f}s, -> resolved "
          f"(alert resolved too) {resolved.ts - t0:.1f}s; {hoarders} sessions terminated")


async def test_postgres_that_cannot_start_is_escalated_not_acted_on(
        stack: PgStack, crew: Bus) -> None:
    async with crew.collect(catalog.EVERYTHING) as col:
        await healthy(col)
        stack.break_config()
        stack.stop_postgres()
        try:
            opened = (await col.wait_for(of_pg(m.IncidentOpened), 30))[0]
            assert opened.invariant == "postgres_up"
            escalated = (await col.wait_for(of_pg(m.IncidentEscalated), 30))[0]
            assert escalated.incident_id == opened.incident_id
            diagnosis = next(e for e in col.events(m.Diagnosis) if e.subject == SUBJECT)
            assert diagnosis.escalate and "No declared action" in diagnosis.hypothesis
            assert not [e for e in col.events(m.ExecutionStarted) if e.subject == SUBJECT]
        finally:
            stack.repair_config()
            stack.start_postgres()
        await healthy(col, 60)
