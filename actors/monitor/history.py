"""What the monitor saw of each subject lately, and its answers to the query service.

The Claude diagnoser's investigation tools ask these over the bus
(bus_schemas.queries: ObsQuery in, ObsReply out); nothing here can write.
"""

from __future__ import annotations

from collections import deque

import msgspec

from bus_schemas.messages import Observation
from bus_schemas.queries import LogsInput, ObservationsInput, ObsPoint, ObsQuery, ObsReply


class History:
    """What the monitor saw of one subject lately: observations and log lines."""

    def __init__(self, max_obs: int = 900, max_lines: int = 2000) -> None:
        self.obs: deque[Observation] = deque(maxlen=max_obs)
        self.lines: deque[tuple[float, str]] = deque(maxlen=max_lines)

    def add(self, obs: Observation) -> None:
        self.obs.append(obs)
        self.lines.extend((obs.ts, line) for line in obs.log_lines)

    def observations(self, q: ObservationsInput, now: float) -> ObsReply:
        lo, hi = now - q.since_s, now - q.until_s
        chosen = [o for o in self.obs if lo <= o.ts <= hi]
        step = max(1, -(-len(chosen) // q.max_points))  # ceil: evenly spaced, newest kept
        picked = chosen[::-1][::step][::-1]
        wanted = set(q.metrics)
        points = [ObsPoint(ts=round(o.ts, 3), up=o.up, error=o.error,
                           metrics={k: v for k, v in o.metrics.items()
                                    if not wanted or k in wanted})
                  for o in picked]
        return ObsReply(ok=True, points=points, truncated=step > 1)

    def logs(self, q: LogsInput, now: float) -> ObsReply:
        needle = q.contains.casefold()
        found = [line for ts, line in self.lines
                 if ts >= now - q.since_s and needle in line.casefold()]
        return ObsReply(ok=True, lines=found[-q.limit:], truncated=len(found) > q.limit)


def answer_obs_query(histories: dict[str, History], data: bytes, now: float) -> ObsReply:
    try:
        q = msgspec.json.decode(data, type=ObsQuery)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return ObsReply(ok=False, error=f"bad query: {exc}")
    history = histories.get(q.subject)
    if history is None:
        return ObsReply(ok=False, error=f"subject {q.subject!r} is not watched by this monitor")
    if q.observations is not None:
        return history.observations(q.observations, now)
    if q.logs is not None:
        return history.logs(q.logs, now)
    return ObsReply(ok=False, error="the query asks for neither observations nor logs")
