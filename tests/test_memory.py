"""Incident memory: folding closed incidents, FTS5 similarity, memory-aware runbooks,
and the auditor answering `similar` over the bus (real nats-server, real processes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg

from actors.auditor.memory import IncidentMemory, fold, match_expression
from actors.diagnoser import runbook
from bus_schemas import catalog
from bus_schemas import messages as m
from bus_schemas.queries import (
    PastIncident,
    SimilarQuery,
    SimilarReply,
    bucket,
    symptom_similarity,
)
from subjects import load
from tests.harness import LEAK, Bus, leak_hypothesis, lifecycle

SLOW_DB = {"p99_ms": 950.0, "pool_utilization": 0.3, "cache_hit_ratio": 0.9,
           "db_p99_ms": 600.0, "error_rate": 0.0, "rps": 40.0}


def test_fold_gives_nothing_while_open_and_the_verified_fix_once_closed() -> None:
    events = lifecycle("i1", LEAK, "scale_pool", {"size": 32})
    assert fold(events[:-1]) is None
    past = fold(events)
    assert past is not None and past.outcome == "resolved"
    assert (past.verified_action, past.verified_params) == ("scale_pool", {"size": 32})
    assert past.tried == ["scale_pool:succeeded"] and past.hypothesis == leak_hypothesis()
    failed = fold(lifecycle("i2", LEAK, "restart_worker", passed=False))
    assert failed is not None and failed.verified_action == ""


def test_memory_learns_only_from_a_fix_that_verified_after_it_ran() -> None:
    events = lifecycle("i1", {"pool_utilization": 1.0}, "recycle_pool")
    credited = fold(events)
    assert credited is not None and credited.verified_action == "recycle_pool"
    # The same incident, but the invariant had recovered before the step started.
    uncredited = [msgspec.structs.replace(e, recovered="before")
                  if isinstance(e, m.Verdict) else e for e in events]
    past = fold(uncredited)
    assert past is not None and past.verified_action == ""
    assert past.tried == ["recycle_pool:succeeded"]


def test_buckets_and_similarity_group_the_same_shape_of_symptoms() -> None:
    assert [bucket(v) for v in (0, 0.05, 0.95, 1.0, 12, 950, -1)] == [
        "zero", "r0", "r4", "r4", "e1", "e2", "neg"]
    nearly = {**LEAK, "pool_utilization": 0.93, "rps": 45.0}
    assert symptom_similarity(LEAK, nearly) == 1.0
    assert symptom_similarity(LEAK, SLOW_DB) < 0.7


def test_match_expression_quotes_every_term_so_log_text_cannot_inject_fts_syntax() -> None:
    q = SimilarQuery(subject="webshop", invariant="latency_p99",
                     text='x" OR NEAR(a b) * ) DROP TABLE incidents; --')
    expr = match_expression(q)
    terms = expr.split(" OR ")
    assert all(t.startswith('"') and t.endswith('"') for t in terms)
    assert '"near"' in terms and '"drop"' in terms


async def test_similar_ranks_the_incident_with_the_same_symptoms_first(tmp_path: Path) -> None:
    mem = await IncidentMemory.open(tmp_path / "memory.db")
    try:
        for iid, symptoms, fix in (("leak1", LEAK, "recycle_pool"),
                                   ("slow1", SLOW_DB, "failover_dependency")):
            past = fold(lifecycle(iid, symptoms, fix))
            assert past is not None
            await mem.upsert(past)
            await mem.upsert(past)  # a trailing event re-indexes: still one entry
        got = await mem.similar(SimilarQuery(subject="webshop", invariant="latency_p99",
                                             symptoms={**LEAK, "rps": 38.0}))
        assert [p.incident_id for p in got] == ["leak1", "slow1"]
        assert got[0].verified_action == "recycle_pool"
        other = await mem.similar(SimilarQuery(subject="another", invariant="latency_p99",
                                               symptoms=LEAK))
        assert other == []
        assert await mem.similar(SimilarQuery(subject="webshop", exclude="leak1",
                                              invariant="latency_p99", symptoms=LEAK)) != []
    finally:
        await mem.close()


async def test_a_query_answers_during_an_upsert_and_never_sees_it_half_done(
        tmp_path: Path) -> None:
    mem = await IncidentMemory.open(tmp_path / "memory.db")
    query = SimilarQuery(subject="webshop", invariant="latency_p99", symptoms=LEAK)
    try:
        first = fold(lifecycle("leak1", LEAK, "recycle_pool"))
        second = fold(lifecycle("leak2", LEAK, "scale_pool", {"size": 32}))
        assert first is not None and second is not None
        await mem.upsert(first)
        async with mem._lock:  # an upsert in progress: its rows written, not committed
            await mem._write(second, msgspec.json.encode(second))
            during = await asyncio.wait_for(mem.similar(query), 2.0)
            await mem.db.commit()
        assert [p.incident_id for p in during] == ["leak1"]
        assert {p.incident_id for p in await mem.similar(query)} == {"leak1", "leak2"}
    finally:
        await mem.close()


async def test_a_recall_asks_only_the_subjects_most_recently_closed_incidents(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from actors.auditor import memory

    monkeypatch.setattr(memory, "RECALL_WINDOW", 3)
    mem = await IncidentMemory.open(tmp_path / "memory.db")
    query = SimilarQuery(subject="webshop", invariant="latency_p99", symptoms=LEAK, limit=20)
    try:
        pasts = {}
        for n in range(5):  # another subject's incidents in between take no window room
            for subject in ("webshop", "other"):
                past = fold(lifecycle(f"{subject}{n}", LEAK, "recycle_pool"))
                assert past is not None
                pasts[past.incident_id] = msgspec.structs.replace(past, subject=subject)
                await mem.upsert(pasts[past.incident_id])
        assert {p.incident_id for p in await mem.similar(query)} == {
            "webshop2", "webshop3", "webshop4"}
        await mem.upsert(pasts["webshop0"])  # re-indexed (a trailing verdict): newest now
        assert {p.incident_id for p in await mem.similar(query)} == {
            "webshop0", "webshop3", "webshop4"}
    finally:
        await mem.close()


async def test_a_version_1_index_is_rebuilt_from_the_stored_records(tmp_path: Path) -> None:
    import sqlite3

    past = fold(lifecycle("leak1", LEAK, "recycle_pool"))
    assert past is not None
    with sqlite3.connect(tmp_path / "memory.db") as db:  # what an older auditor wrote
        db.executescript("""
            CREATE TABLE incidents (incident_id TEXT PRIMARY KEY, subject TEXT NOT NULL,
                invariant TEXT NOT NULL, closed_at REAL NOT NULL, record BLOB NOT NULL);
            CREATE VIRTUAL TABLE incidents_fts USING fts5(
                incident_id UNINDEXED, invariant, symptoms, text,
                tokenize = "unicode61 tokenchars '_'");""")
        db.execute("INSERT INTO incidents VALUES (?, ?, ?, ?, ?)",
                   ("leak1", "webshop", "latency_p99", 1.0, msgspec.json.encode(past)))
        db.execute("INSERT INTO incidents VALUES (?, ?, ?, ?, ?)",
                   ("torn", "webshop", "latency_p99", 1.0, b"{not json"))
        db.execute("INSERT INTO incidents_fts VALUES ('leak1', 'latency_p99', '', '')")
    mem = await IncidentMemory.open(tmp_path / "memory.db")
    try:
        got = await mem.similar(SimilarQuery(subject="webshop", invariant="latency_p99",
                                             symptoms=LEAK))
        assert [p.incident_id for p in got] == ["leak1"]
        assert got[0].verified_action == "recycle_pool"
    finally:
        await mem.close()
    with sqlite3.connect(tmp_path / "memory.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2


def _past(symptoms: dict[str, float], action: str, params: dict[str, object] | None = None,
          invariant: str = "latency_p99", hypothesis: str | None = None) -> PastIncident:
    return PastIncident(incident_id="past0001", subject="webshop", invariant=invariant,
                        symptoms=symptoms, verified_action=action, verified_params=params or {},
                        hypothesis=leak_hypothesis() if hypothesis is None else hypothesis)


def _incident(symptoms: dict[str, float], invariant: str = "latency_p99") -> m.IncidentOpened:
    return m.IncidentOpened(incident_id=m.new_id(), subject="webshop", invariant=invariant,
                            summary="p99", value=950, threshold=250, symptoms=symptoms)


def test_runbook_ranks_first_the_action_that_verified_for_similar_symptoms() -> None:
    d = load("webshop")
    inc = _incident(LEAK)
    plain = runbook.diagnose(inc, d)
    assert plain.actions[0].action == "recycle_pool"
    ranked = runbook.apply_memory(plain, inc, [_past(LEAK, "scale_pool", {"size": 32})],
                                  d.actions)
    assert [(a.action, a.params) for a in ranked.actions[:2]] == [
        ("scale_pool", {"size": 32}), ("recycle_pool", {})]
    assert len(ranked.actions) == len(plain.actions)  # moved, not duplicated
    assert any("memory: incident past0001" in e for e in ranked.evidence)


NOSPACE = {"nospace_alarm": 1.0, "db_size_ratio": 1.02, "quorum_members": 3.0}


def test_a_verified_remedy_of_several_steps_is_remembered_and_ranked_whole() -> None:
    # Found by the full eval campaign: a second NOSPACE on the same cluster was "fixed" by
    # compact alone, three times, because memory kept only the verified plan's first step.
    d = load("kvcluster")
    inc = _incident(NOSPACE, invariant="low_disk_space")
    plain = runbook.diagnose(inc, d)
    remedy = plain.actions[0]
    assert remedy.action == "nospace_repair" and len(remedy.steps) == 5
    env = {"incident_id": "past0002", "subject": "kv"}
    steps = [m.PlanStep(step_id=s.id, action=s.action, params=s.params) for s in remedy.steps]
    events = [
        m.IncidentOpened(**env, invariant="low_disk_space", summary="full", value=1.02,
                         threshold=0.95, symptoms=NOSPACE),
        m.Diagnosis(**env, invariant="low_disk_space", hypothesis=plain.hypothesis),
        m.Plan(**env, plan_id="p2", invariant="low_disk_space", attempt=1, steps=steps),
        m.Verdict(**env, plan_id="p2", invariant="low_disk_space", passed=True,
                  reason="held", recovered="after"),
        m.IncidentResolved(**env, invariant="low_disk_space", reason="holds again"),
    ]
    past = fold(events)
    assert past is not None
    assert past.verified_steps == ["compact", "defragment", "defragment", "defragment",
                                   "disarm_alarm"]
    ranked = runbook.apply_memory(plain, inc, [past], d.actions)
    assert [a.action for a in ranked.actions] == ["nospace_repair"]  # never compact alone
    assert ranked.actions[0].steps == remedy.steps


def test_memory_is_ignored_for_other_symptoms_invariants_or_escalating_rules() -> None:
    d = load("webshop")
    inc = _incident(LEAK)
    plain = runbook.diagnose(inc, d)
    for past in (_past(SLOW_DB, "failover_dependency"),
                 _past(LEAK, "scale_pool", {"size": 32}, invariant="error_rate"),
                 _past(LEAK, "drop_database"), _past(LEAK, "scale_pool", {"size": "huge"}),
                 # Same numbers, another diagnosis back then: not the same cause.
                 _past(LEAK, "scale_pool", {"size": 32}, hypothesis="a slow replica")):
        assert runbook.apply_memory(plain, inc, [past], d.actions) == plain
    upstream = _incident({"upstream_error_rate": 1.0, "pool_utilization": 0.1},
                         invariant="error_rate")
    escalating = runbook.diagnose(upstream, d)
    assert escalating.escalate
    past = _past(upstream.symptoms, "restart_worker", invariant="error_rate")
    assert runbook.apply_memory(escalating, upstream, [past], d.actions) == escalating


@pytest.mark.e2e
async def test_auditor_indexes_closed_incidents_and_runbook_diagnoser_uses_them(
        bus: Bus) -> None:
    bus.spawn("auditor")
    bus.spawn("diagnoser")
    await bus.wait_heartbeat("auditor")
    await bus.wait_heartbeat("diagnoser")
    producers = {m.IncidentOpened: "detector", m.IncidentResolved: "detector",
                 m.Diagnosis: "diagnoser", m.Plan: "planner", m.ExecutionResult: "executor",
                 m.Verdict: "verifier"}
    for event in lifecycle("leak-before", LEAK, "scale_pool", {"size": 32}):
        await bus.publish(producers[type(event)], event)
    nc = await bus.connect("operator")
    query = SimilarQuery(subject="webshop", invariant="latency_p99", symptoms=LEAK)
    similar: list[dict[str, object]] = []
    for _ in range(100):  # until the auditor has recorded and indexed the resolution
        reply = await nc.request(catalog.service_subject("auditor", "similar"),
                                 msgspec.json.encode(query), timeout=5)
        similar = msgspec.json.decode(reply.data).get("similar", [])
        if similar:
            break
        await asyncio.sleep(0.1)
    assert [s["incident_id"] for s in similar] == ["leak-before"]
    assert similar[0]["verified_action"] == "scale_pool"
    bad = await nc.request(catalog.service_subject("auditor", "similar"), b"{nope",
                           timeout=5)
    assert msgspec.json.decode(bad.data)["ok"] is False

    inc = _incident(LEAK)
    async with bus.collect() as col:
        await bus.publish("detector", inc)
        [d] = await col.wait_for(lambda e: isinstance(e, m.Diagnosis)
                                 and e.causation_id == inc.id)
    assert d.source == "runbook"
    assert [(a.action, a.params) for a in d.actions[:2]] == [
        ("scale_pool", {"size": 32}), ("recycle_pool", {})]
    assert any("memory: incident leak-bef" in e for e in d.evidence)


@pytest.mark.e2e
async def test_a_recall_asked_ahead_is_used_only_when_the_query_is_unchanged(bus: Bus) -> None:
    """The diagnoser asks the memory while the monitor's lookback runs; the lookback may
    change the query's text, and then the early answer must not be used."""
    from actors.diagnoser.actor import IncidentRecall

    auditor = await bus.connect("auditor")
    asked: list[SimilarQuery] = []

    async def answer(msg: Msg) -> None:
        q = msgspec.json.decode(msg.data, type=SimilarQuery)
        asked.append(q)
        past = PastIncident(incident_id=f"past-{len(asked)}", subject=q.subject,
                            invariant=q.invariant, opened_at=1.0, closed_at=2.0,
                            outcome="resolved", symptoms=q.symptoms)
        await msg.respond(msgspec.json.encode(SimilarReply(ok=True, similar=[past])))

    await auditor.subscribe(catalog.service_subject("auditor", "similar"), cb=answer)
    await auditor.flush()
    recall = IncidentRecall(await bus.connect("diagnoser"))

    async def asked_ahead(n: int) -> None:  # the lookback takes this long
        for _ in range(200):
            if len(asked) == n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(asked)} queries asked, not {n}")

    inc = _incident(LEAK)
    recall.prefetch(inc)
    await asked_ahead(1)
    got = await recall.recall(inc)  # the same query: the early answer, no second ask
    assert [p.incident_id for p in got] == ["past-1"] and len(asked) == 1

    inc = _incident(LEAK)
    recall.prefetch(inc)
    await asked_ahead(2)
    looked_back = msgspec.structs.replace(
        inc, recent_logs=["ERROR pool: timed out waiting for a connection", *inc.recent_logs])
    got = await recall.recall(looked_back)  # new text: asked again, with it
    assert [p.incident_id for p in got] == ["past-3"] and len(asked) == 3
    assert "timed out waiting" in asked[-1].text and "timed out" not in asked[-2].text

    other = _incident(LEAK)
    recall.prefetch(other)
    recall.forget(other.incident_id)  # a diagnosis that never recalled: never asked
    await asyncio.sleep(0.1)
    assert len(asked) == 3
