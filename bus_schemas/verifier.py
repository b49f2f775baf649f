"""The verifier's KV bucket as a contract: what it knows of each incident.

The verifier records every incident it hears of (key `incident.<id>`, kept a
week), with `resolved_at` once the detector resolved it. The executor reads the
same record at its last look before a step, so it never acts for an incident
that is already healthy.
"""

from __future__ import annotations

import msgspec

INCIDENT_PREFIX = "incident."


class IncidentRecord(msgspec.Struct, kw_only=True):
    subject: str
    invariant: str
    opened_at: float
    resolved_at: float | None = None


def incident_key(incident_id: str) -> str:
    return INCIDENT_PREFIX + incident_id
