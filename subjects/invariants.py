"""Pure invariant evaluation: no I/O, no clocks, only observation timestamps.

Two layers, shared by the detector and the verifier:

- `assess` turns one sample into an `Assessment` for one `InvariantSpec`:
  the value judged (the metric itself, its rate of change over `window_s`,
  or the metric against its learned baseline), whether it is *breaking*
  (outside the break limit) and whether it is *clear* (inside the hysteresis
  limit). It carries the per-invariant memory it needs in a `Learner`
  (the rate window and the baseline EWMA).
- `step` runs the incident state machine over assessments: open once
  breaking continuously for `for_s`, resolve once clear continuously for
  `for_s`; between the two limits nothing changes, which is what stops
  flapping around a threshold. Transitions are only *emitted* on fresh
  samples: stale ones (a backlog after a restart) move the timers, never
  open or resolve on their own.

All state is immutable msgspec Structs, so a caller can evaluate on a copy
and commit it only once it is persisted, and can store it as JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import msgspec

from subjects.base import InvariantSpec

# Baseline learning: EWMA weight of a new healthy sample, and how many healthy
# samples it takes before the learned baseline is trusted over the floor alone.
BASELINE_ALPHA = 0.05
BASELINE_WARMUP = 10
# A gap this long between two samples breaks "continuously": timers restart.
MAX_GAP_S = 10.0
# Scrape timestamps jitter by milliseconds: at a 1 s cadence a 2 s for-duration
# measured as 1.998 s must not cost a whole extra scrape of detection latency.
JITTER_S = 0.05
# IncidentUpdated: at most this often, and only when the value moved this much.
UPDATE_EVERY_S = 5.0
UPDATE_REL_CHANGE = 0.10


class Sample(msgspec.Struct, frozen=True):
    ts: float
    value: float | None  # None: the metric is missing from the observation
    down: bool = False  # the subject did not answer its scrape
    alerting: bool = False  # an alert the invariant claims (InvariantSpec.alerts) fires


class Learner(msgspec.Struct, frozen=True, kw_only=True):
    window: tuple[tuple[float, float], ...] = ()  # (ts, metric) within window_s, for rate
    baseline: float | None = None
    samples: int = 0  # healthy samples the baseline has learned from


class Assessment(msgspec.Struct, frozen=True, kw_only=True):
    value: float | None  # the judged value; None: no information in this sample
    breaking: bool
    clear: bool  # within the hysteresis limit: healthy enough to resolve
    limit: float
    clear_limit: float
    down: bool = False
    alerting: bool = False

    @property
    def informative(self) -> bool:
        return self.value is not None or self.breaking


class OpenIncident(msgspec.Struct, frozen=True, kw_only=True):
    incident_id: str
    opened_at: float
    last_value: float
    last_update_at: float


class InvState(msgspec.Struct, frozen=True, kw_only=True):
    learner: Learner = Learner()
    breach_since: float | None = None
    healthy_since: float | None = None
    last_ts: float | None = None
    open: OpenIncident | None = None


Transition = Literal["open", "update", "resolve"]


class Step(msgspec.Struct, frozen=True, kw_only=True):
    state: InvState
    assessment: Assessment
    transition: Transition | None = None


def healthy(value: float, limit: float, op: str) -> bool:
    return value < limit if op == "<" else value > limit


def limits(spec: InvariantSpec, learner: Learner) -> tuple[float, float]:
    """(break limit, clear limit) for the spec given what has been learned."""
    limit = spec.threshold
    if spec.kind == "baseline" and learner.baseline is not None and (
        learner.samples >= BASELINE_WARMUP
    ):
        # The threshold is a floor (a ceiling for op '>'): a tiny baseline must
        # not turn normal noise into an incident.
        if spec.op == "<":
            limit = max(spec.threshold, spec.factor * learner.baseline)
        else:
            limit = min(spec.threshold, learner.baseline / spec.factor)
    clear = spec.clear if spec.clear is not None else spec.threshold
    if spec.kind == "baseline" and spec.threshold != 0:
        clear = limit * (clear / spec.threshold)  # the same hysteresis ratio
    # A clear limit outside the break limit would resolve while still breaking.
    clear = min(clear, limit) if spec.op == "<" else max(clear, limit)
    return limit, clear


def _rate(window: tuple[tuple[float, float], ...], window_s: float) -> float | None:
    if len(window) < 2:
        return None
    (t0, v0), (t1, v1) = window[0], window[-1]
    if t1 - t0 < window_s / 2:  # too little history for a meaningful slope
        return None
    return (v1 - v0) / (t1 - t0)


def assess(spec: InvariantSpec, learner: Learner, sample: Sample) -> tuple[Learner, Assessment]:
    """Judge one sample. Returns the learner with this sample's window added
    (the baseline is only taught by `learn`, with healthy samples)."""
    value = sample.value
    if value is not None and not math.isfinite(value):
        value = None
    window = learner.window
    if spec.kind == "rate" and value is not None:
        window = tuple(p for p in window if p[0] >= sample.ts - spec.window_s and p[0] < sample.ts)
        window = (*window, (sample.ts, value))
        value = _rate(window, spec.window_s)
    learner = msgspec.structs.replace(learner, window=window)
    limit, clear_limit = limits(spec, learner)
    if sample.alerting:  # the alert's word stands until it resolves, whatever the metric
        a = Assessment(value=value, breaking=True, clear=False, limit=limit,
                       clear_limit=clear_limit, down=sample.down, alerting=True)
    elif sample.down and spec.down_breaks:
        a = Assessment(value=value, breaking=True, clear=False, limit=limit,
                       clear_limit=clear_limit, down=True)
    elif value is None or sample.down:
        a = Assessment(value=None, breaking=False, clear=False, limit=limit,
                       clear_limit=clear_limit, down=sample.down)
    else:
        a = Assessment(value=value, breaking=not healthy(value, limit, spec.op),
                       clear=healthy(value, clear_limit, spec.op), limit=limit,
                       clear_limit=clear_limit)
    return learner, a


def learn(spec: InvariantSpec, learner: Learner, sample: Sample) -> Learner:
    """Teach the baseline one healthy sample (EWMA)."""
    if spec.kind != "baseline" or sample.value is None or not math.isfinite(sample.value):
        return learner
    b = learner.baseline
    b = sample.value if b is None else b + BASELINE_ALPHA * (sample.value - b)
    return msgspec.structs.replace(learner, baseline=b, samples=learner.samples + 1)


def _moved(old: float, new: float) -> bool:
    scale = abs(old) if old != 0 else 1.0
    return abs(new - old) >= UPDATE_REL_CHANGE * scale


def step(spec: InvariantSpec, state: InvState, sample: Sample, *, fresh: bool,
         new_incident_id: str) -> Step:
    """Advance one invariant's state by one sample.

    `fresh`: the sample is recent enough to act on; stale samples update the
    timers and the learner but never produce a transition. `new_incident_id`
    is used if this sample opens an incident.
    """
    learner, a = assess(spec, state.learner, sample)
    if state.last_ts is not None and sample.ts <= state.last_ts:
        return Step(state=state, assessment=a)  # out of order or a repeat: already judged
    gap = state.last_ts is not None and sample.ts - state.last_ts > MAX_GAP_S
    st = msgspec.structs.replace(state, learner=learner, last_ts=sample.ts)
    if gap:
        st = msgspec.structs.replace(st, breach_since=None, healthy_since=None)
    if not a.informative:
        return Step(state=st, assessment=a)
    value = a.value if a.value is not None else a.limit
    ts = sample.ts
    if st.open is None:
        if not a.breaking:
            if st.breach_since is None:
                st = msgspec.structs.replace(st, learner=learn(spec, st.learner, sample))
            return Step(state=msgspec.structs.replace(st, breach_since=None), assessment=a)
        since = st.breach_since if st.breach_since is not None else ts
        st = msgspec.structs.replace(st, breach_since=since)
        if fresh and (a.alerting or ts - since >= spec.for_s - JITTER_S):
            inc = OpenIncident(incident_id=new_incident_id, opened_at=ts, last_value=value,
                               last_update_at=ts)
            st = msgspec.structs.replace(st, open=inc, healthy_since=None)
            return Step(state=st, assessment=a, transition="open")
        return Step(state=st, assessment=a)
    # An incident is open.
    if a.clear:
        since = st.healthy_since if st.healthy_since is not None else ts
        st = msgspec.structs.replace(st, healthy_since=since)
        if fresh and ts - since >= spec.for_s - JITTER_S:
            st = msgspec.structs.replace(st, open=None, breach_since=None, healthy_since=None)
            return Step(state=st, assessment=a, transition="resolve")
        return Step(state=st, assessment=a)
    st = msgspec.structs.replace(st, healthy_since=None)
    cur = st.open
    assert cur is not None
    if (fresh and a.breaking and ts - cur.last_update_at >= UPDATE_EVERY_S
            and _moved(cur.last_value, value)):
        moved = msgspec.structs.replace(cur, last_value=value, last_update_at=ts)
        return Step(state=msgspec.structs.replace(st, open=moved), assessment=a,
                    transition="update")
    return Step(state=st, assessment=a)


def sample_of(spec: InvariantSpec, ts: float, up: bool, metrics: dict[str, float]) -> Sample:
    alerting = any(metrics.get(ALERT_PREFIX + name, 0.0) > 0 for name in spec.alerts)
    return Sample(ts=ts, value=metrics.get(spec.metric), down=not up, alerting=alerting)


# --- alerts -----------------------------------------------------------------------
# The monitor reports each Alertmanager alert routed to a subject as the observation
# metric `alert:<alertname>`: how many of its fingerprints fire (0 once all resolved).

ALERT_PREFIX = "alert:"
ALERT_NAME = r"[A-Za-z_:][A-Za-z0-9_:]{0,127}"  # Prometheus's alert names, bounded


def alert_invariant(alertname: str) -> InvariantSpec:
    """The invariant of an alert no declared invariant claims: broken while it fires,
    opened and resolved by the alert alone (its `for` already waited)."""
    return InvariantSpec(name=ALERT_PREFIX + alertname, metric=ALERT_PREFIX + alertname,
                         description=f"the Alertmanager alert {alertname} is not firing",
                         threshold=0.5, for_s=0.0)


def judged(declared: Iterable[InvariantSpec], metrics: Iterable[str],
           known: Iterable[str] = ()) -> list[InvariantSpec]:
    """The invariants one observation is judged on: the declared ones, then one per alert
    that no declared invariant claims, for each alert metric observed and each alert
    invariant already `known` (open in state: it must not be forgotten when the monitor
    loses the alert; with its metric missing it stays as it is)."""
    specs = list(declared)
    claimed = {ALERT_PREFIX + a for s in specs for a in s.alerts} | {s.name for s in specs}
    extra = [m for m in (*metrics, *known) if m.startswith(ALERT_PREFIX) and m not in claimed]
    return specs + [alert_invariant(m.removeprefix(ALERT_PREFIX)) for m in dict.fromkeys(extra)]
