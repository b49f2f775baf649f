"""The shared actor runtime: the Actor base and the process that runs one.

Actor packages import from here, from `bus_schemas` and from `subjects`, and
from nothing else (tests/test_layout.py holds them to it).
"""

from actors.runtime.actor import Actor, Delivery, Reject, derive_id, follow_id
from actors.runtime.process import MetricsPortError, Runtime

__all__ = ["Actor", "Delivery", "MetricsPortError", "Reject", "Runtime", "derive_id", "follow_id"]
