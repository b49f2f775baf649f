"""Alertmanager as an incident source: routing, fingerprint identity, the book's
durability, and how an alert folds into the invariants the detector judges."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.monitor.alerts import AlertBook
from actors.runtime.config import AlertmanagerConfig, AlertRoute
from subjects import invariants as inv
from subjects.base import InvariantSpec

CFG = AlertmanagerConfig(listen="127.0.0.1:9095", keep_resolved_s=60, routes=[
    AlertRoute(subject="pg", match={"job": "postgres"}),
    AlertRoute(subject="shop", match_re={"instance": r"shop-\d+"})])


def payload(*alerts: dict[str, Any]) -> bytes:
    return json.dumps({"version": "4", "status": "firing", "receiver": "menders",
                       "groupLabels": {}, "commonLabels": {}, "externalURL": "http://am",
                       "alerts": list(alerts)}).encode()


def alert(name: str, status: str = "firing", fp: str = "f1", **labels: str) -> dict[str, Any]:
    return {"status": status, "labels": {"alertname": name, **labels},
            "annotations": {"summary": f"{name} is {status}"}, "fingerprint": fp,
            "startsAt": "2026-12-03T12:00:00Z", "endsAt": "0001-01-01T00:00:00Z"}


def book(tmp_path: Path | None = None) -> AlertBook:
    return AlertBook(CFG, ["pg", "shop"], tmp_path / "alerts.json" if tmp_path else None)


def test_alerts_route_by_labels_and_unknown_ones_are_counted_and_dropped() -> None:
    b = book()
    applied = b.apply(payload(alert("PgConns", job="postgres"),
                              alert("ShopSlow", fp="f2", instance="shop-3"),
                              alert("Other", fp="f3", job="mysql"),
                              alert("Named", fp="f4", menders_subject="shop"),
                              alert("Ghost", fp="f5", menders_subject="nope"),
                              alert("bad name!", fp="f6", job="postgres")), 100.0)
    assert applied.counts == {"firing": 3, "unrouted": 2, "invalid": 1}
    assert b.metrics("pg", 100.0) == {"alert:PgConns": 1.0}
    assert b.metrics("shop", 100.0) == {"alert:ShopSlow": 1.0, "alert:Named": 1.0}
    assert b.route({"instance": "shop-3x"}) is None  # match_re matches whole values


def test_one_alert_is_one_fingerprint_however_often_it_is_notified() -> None:
    b = book()
    assert b.apply(payload(alert("PgConns", job="postgres")), 1.0).counts == {"firing": 1}
    for t in (2.0, 3.0, 4.0):
        again = b.apply(payload(alert("PgConns", job="postgres")), t)
        assert again.counts == {"repeated": 1} and again.subjects == []
    assert b.metrics("pg", 5.0) == {"alert:PgConns": 1.0}
    # Two instances of one alert are two fingerprints: the metric counts both.
    b.apply(payload(alert("PgConns", fp="f9", job="postgres", instance="b")), 6.0)
    assert b.metrics("pg", 6.0) == {"alert:PgConns": 2.0}
    notes = b.take_notes("pg")
    assert len(notes) == 2 and json.loads(notes[0])["alert"] == "PgConns"
    assert b.take_notes("pg") == []  # each change is told once


def test_a_resolved_alert_reads_zero_for_a_while_then_is_dropped() -> None:
    b = book()
    b.apply(payload(alert("PgConns", job="postgres")), 0.0)
    assert b.apply(payload(alert("PgConns", "resolved", job="postgres")),
                   10.0).counts == {"resolved": 1}
    assert b.metrics("pg", 20.0) == {"alert:PgConns": 0.0}
    assert b.metrics("pg", 71.0) == {}
    # A resolution of an alert never seen firing changes nothing.
    assert b.apply(payload(alert("Never", "resolved", fp="zz", job="postgres")),
                   72.0).counts == {"repeated": 1}


def test_the_book_survives_a_restart_and_an_unreadable_one_starts_empty(
        tmp_path: Path) -> None:
    b = book(tmp_path)
    b.apply(payload(alert("PgConns", job="postgres")), 1.0)
    assert book(tmp_path).metrics("pg", 2.0) == {"alert:PgConns": 1.0}
    (tmp_path / "alerts.json").write_text("{not json")
    assert book(tmp_path).metrics("pg", 2.0) == {}


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"alerts": 3}',
                                  b'{"alerts": [{"status": "firing"}]}'])
def test_a_body_that_is_not_a_v4_payload_is_refused(body: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        book().apply(body, 1.0)


def test_a_route_needs_labels_and_the_receiver_a_host_and_port() -> None:
    with pytest.raises(msgspec.ValidationError, match="give match or match_re"):
        msgspec.convert({"routes": [{"subject": "pg"}]}, AlertmanagerConfig)
    with pytest.raises(msgspec.ValidationError, match="want host:port"):
        msgspec.convert({"listen": "9095"}, AlertmanagerConfig)
    with pytest.raises(msgspec.ValidationError, match="does not compile"):
        msgspec.convert({"routes": [{"subject": "pg", "match_re": {"a": "("}}]},
                        AlertmanagerConfig)


HEADROOM = InvariantSpec(name="connection_headroom", metric="use", description="d",
                         threshold=0.75, clear=0.5, for_s=5.0, alerts=("PgConns",))


def run(spec: InvariantSpec, samples: list[tuple[float, dict[str, float]]],
        state: inv.InvState | None = None) -> tuple[inv.InvState, list[str]]:
    state = state or inv.InvState()
    seen = []
    for ts, metrics in samples:
        res = inv.step(spec, state, inv.sample_of(spec, ts, True, metrics), fresh=True,
                       new_incident_id=f"i{ts}")
        state = res.state
        if res.transition:
            seen.append(f"{res.transition}@{ts:g}")
    return state, seen


def test_an_alert_claimed_by_an_invariant_breaks_it_at_once_and_holds_it_open() -> None:
    # The metric alone would need 5 s; the alert already waited its own `for`.
    state, seen = run(HEADROOM, [(0, {"use": 0.9, "alert:PgConns": 1})])
    assert seen == ["open@0"]
    # The metric recovers but the alert still fires: the incident stays open.
    state, seen = run(HEADROOM, [(t, {"use": 0.1, "alert:PgConns": 1}) for t in
                                 range(1, 20)], state)
    assert [t for t in seen if not t.startswith("update")] == [] and state.open is not None
    state, seen = run(HEADROOM, [(t, {"use": 0.1, "alert:PgConns": 0}) for t in
                                 range(20, 30)], state)
    assert seen == ["resolve@25"]


def test_the_alert_and_the_metric_it_fires_on_are_one_incident() -> None:
    samples = [(t, {"use": 0.9}) for t in range(0, 6)]  # the metric opens it first
    samples += [(t, {"use": 0.9, "alert:PgConns": 1}) for t in range(6, 12)]
    specs = inv.judged([HEADROOM], ["use", "alert:PgConns"])
    assert [s.name for s in specs] == ["connection_headroom"]  # no second invariant
    _, seen = run(HEADROOM, samples)
    assert seen == ["open@5"]


def test_an_alert_nobody_claims_is_its_own_invariant_and_never_forgotten() -> None:
    specs = inv.judged([HEADROOM], ["use", "alert:PgDown", "alert:PgConns"])
    assert [s.name for s in specs] == ["connection_headroom", "alert:PgDown"]
    down = specs[1]
    state, seen = run(down, [(0, {"alert:PgDown": 1}), (1, {"alert:PgDown": 1})])
    assert seen == ["open@0"]
    # The monitor lost the alert (no metric): it stays judged, and open.
    assert [s.name for s in inv.judged([HEADROOM], ["use"], ["alert:PgDown"])][1:] == [
        "alert:PgDown"]
    state, seen = run(down, [(2, {})], state)
    assert seen == [] and state.open is not None
    _, seen = run(down, [(3, {"alert:PgDown": 0})], state)
    assert seen == ["resolve@3"]
