"""The demo's table row for one fault: only the incidents that fault opened count."""

from __future__ import annotations

from actors.cli.demo import Row, _summarize
from bus_schemas import messages as m
from subjects.kvcluster.faults import FAULTS

QUORUM_LOST = next(f for f in FAULTS if f.name == "quorum_lost")
T0 = 1000.0


def _events(*, earlier: str, mine: str | None) -> list[m.Event]:
    """An incident left open by the previous fault escalates during this one; this
    fault's own incident (if it was detected) escalates too."""
    events: list[m.Event] = [
        m.Diagnosis(incident_id=earlier, invariant="leader_churn", ts=T0 + 1,
                    hypothesis="Leadership keeps changing", subject="kvcluster"),
        m.IncidentEscalated(incident_id=earlier, reason="move_leader failed", ts=T0 + 2,
                            subject="kvcluster"),
    ]
    if mine is not None:
        events += [
            m.IncidentOpened(incident_id=mine, invariant="member_down", summary="2 down",
                             value=2, threshold=0.5, ts=T0 + 3, subject="kvcluster"),
            m.Diagnosis(incident_id=mine, invariant="member_down", ts=T0 + 3.5,
                        hypothesis="A majority of members is gone", escalate=True,
                        subject="kvcluster"),
            m.IncidentEscalated(incident_id=mine, reason="a human's call", ts=T0 + 4,
                                subject="kvcluster"),
        ]
    return events


def test_an_earlier_incident_escalating_is_not_this_fault_escalated() -> None:
    # What one CI run printed as the quorum_lost row: the previous fault's churn
    # incident escalated before the quorum loss was detected, and the row took it.
    row = Row(QUORUM_LOST, "kvcluster")
    _summarize(row, _events(earlier="a" * 32, mine=None), T0)
    assert row.outcome == "not detected" and row.diagnosis == "" and not row.ok


def test_the_row_tells_this_fault_s_own_incident() -> None:
    row = Row(QUORUM_LOST, "kvcluster")
    _summarize(row, _events(earlier="a" * 32, mine="b" * 32), T0)
    assert row.outcome == "escalated" and row.ok
    assert row.diagnosis == "A majority of members is gone" and row.detected_after == 3.0
