"""The detector: checks every invariant of a subject on each observation.

Evaluation is pure (subjects.invariants); this module adds the bus and the
durability around it.

Partitions. Observations are stored in catalog.OBS_PARTITIONS partitions by
subject name, one durable consumer each; the runtime consumes the ones this
process holds a lease on (actors.runtime.partitions), so N detector processes
share the subjects, and a dead one's partitions pass to the survivors. On
taking a partition the detector reads its subjects' state afresh from KV.

State and restarts. Which incidents are open, the for-duration and
hysteresis timers and the learned baselines live in the KV bucket
`menders_detector`, one key per managed subject (`subject.<name>`), so a
restarted detector carries on with the same open incidents instead of
opening duplicates. Each write is a compare-and-swap on the key's revision:
a second detector process that raced us fails its write, reloads, and its
message is redelivered and re-judged against the winner's state.

Exactly one event per transition (a transactional outbox). For an
observation that causes transitions, the new state is written *with* the
events in its `outbox` before they are published, then written again with
the outbox cleared. A crash after the first write leaves the events in KV:
the next process publishes them when it loads the key. A crash before it
leaves the old state, and the redelivered observation produces the same
events again. Event and incident ids are derived from the observation id,
so any repeat is dropped by JetStream's Nats-Msg-Id dedup. State without
transitions is written only when timers start or stop, or every
`SAVE_EVERY_S` for the baselines; rate windows refill on their own.

Staleness. Observations are judged on their own timestamps. One older than
`STALE_AFTER_S` when it arrives (a backlog after a restart) moves timers
and baselines but opens, updates and resolves nothing: only a fresh
observation can do that, so nothing opens on old data, yet a breach that the
backlog shows has lasted for_s opens on the first fresh observation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

import subjects
from actors.runtime import Actor, Delivery, Runtime, derive_id, follow_id
from actors.runtime.kv import KvConflict, Records, Unreadable
from actors.runtime.logs import get_logger
from actors.runtime.partitions import in_partition
from bus_schemas import catalog
from bus_schemas.messages import (
    Event,
    IncidentOpened,
    IncidentResolved,
    IncidentUpdated,
    Observation,
)
from subjects import invariants as inv
from subjects.base import InvariantSpec, SubjectDefinition

log = get_logger("menders.detector")

STALE_AFTER_S = 5.0
SAVE_EVERY_S = 30.0
MAX_LOG_LINES = 20
MAX_LOG_LINE_CHARS = 1000

IncidentEvent = IncidentOpened | IncidentUpdated | IncidentResolved


class SubjectState(msgspec.Struct, kw_only=True):
    last_ts: float = 0.0
    saved_ts: float = 0.0
    invariants: dict[str, inv.InvState] = {}
    outbox: list[IncidentEvent] = []


@dataclass
class _Slot:
    state: SubjectState
    revision: int | None  # None: the key does not exist yet


def _timers(s: SubjectState) -> dict[str, tuple[object, ...]]:
    return {k: (v.open, v.breach_since, v.healthy_since) for k, v in s.invariants.items()}


class Detector(Actor):
    name = "detector"

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        self.kv: Records[SubjectState] | None = None
        self.slots: dict[str, _Slot] = {}
        self._ignored: set[str] = set()
        m = rt.metrics
        self.opened = m.counter("menders_incidents_opened", "Incidents opened",
                                ["subject", "invariant"])
        self.resolved = m.counter("menders_incidents_resolved", "Incidents resolved",
                                  ["subject", "invariant"])
        self.open_gauge = m.gauge("menders_incidents_open", "Incidents open now", ["subject"])
        self.eval_seconds = m.histogram("menders_detector_evaluation_seconds",
                                        "Time to evaluate one observation, KV writes included",
                                        ["subject"])
        self.obs_age = m.histogram("menders_detector_observation_age_seconds",
                                   "Observation age when judged (scrape to evaluation)",
                                   ["subject"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5,
                                                         10, 30, 60))
        self.skipped = m.counter("menders_detector_skipped",
                                 "Observations not judged, by reason", ["reason"])

    async def setup(self) -> None:
        assert self.rt.js is not None
        self.kv = Records(await self.rt.js.key_value(catalog.DETECTOR_BUCKET), SubjectState)

    # --- partitions ---------------------------------------------------------------

    async def partition_acquired(self, partition: int) -> None:
        # Read afresh what the previous owner left (its cached copy here is stale), and
        # publish any outbox it crashed with, before the partition's first message.
        for name in in_partition(self.config.subjects, partition):
            self.slots.pop(name, None)
            await self._slot(name)

    async def partition_released(self, partition: int) -> None:
        for name in in_partition(self.config.subjects, partition):
            self.slots.pop(name, None)

    # --- state --------------------------------------------------------------------

    async def _slot(self, subject: str) -> _Slot:
        slot = self.slots.get(subject)
        if slot is None:
            slot = await self._load(subject)
            self.slots[subject] = slot
            if slot.state.outbox:
                log.info("publishing a predecessor's outbox",
                         extra={"subject": subject, "events": len(slot.state.outbox)})
                await self._flush(subject, slot.state)
        return slot

    async def _load(self, subject: str) -> _Slot:
        assert self.kv is not None
        try:
            got = await self.kv.get(f"subject.{subject}")
        except Unreadable as exc:
            # Unreadable state must not wedge detection: start over (overwriting it), loudly.
            log.error("detector state unreadable, starting fresh",
                      extra={"subject": subject, "err": str(exc)})
            return _Slot(SubjectState(), exc.revision)
        if got is None:
            return _Slot(SubjectState(), None)
        return _Slot(got.value, got.revision)

    async def _save(self, subject: str, state: SubjectState) -> None:
        """Compare-and-swap the subject's state; on a lost race reload and raise."""
        assert self.kv is not None
        slot = self.slots[subject]
        try:
            saved = await self.kv.save(f"subject.{subject}", state, slot.revision)
        except KvConflict:
            self.slots[subject] = await self._load(subject)
            raise
        self.slots[subject] = _Slot(state, saved.revision)

    async def _flush(self, subject: str, state: SubjectState) -> None:
        for event in state.outbox:
            await self.rt.publish(event)
        await self._save(subject, msgspec.structs.replace(state, outbox=[]))

    # --- judging ------------------------------------------------------------------

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        assert isinstance(event, Observation)
        started = time.perf_counter()
        subject = event.subject
        definition = self._definition(subject)
        if definition is None:
            self.skipped.labels(reason="unknown_subject").inc()
            return ()
        slot = await self._slot(subject)
        if slot.state.outbox:  # a publish failed after the state was saved: finish it
            await self._flush(subject, slot.state)
            slot = self.slots[subject]
        if event.ts <= slot.state.last_ts:
            self.skipped.labels(reason="out_of_order").inc()
            return ()
        age = time.time() - event.ts
        self.obs_age.labels(subject=subject).observe(max(age, 0.0))
        new, events = self._judge(definition, slot.state, event, fresh=age <= STALE_AFTER_S)
        if events or _timers(new) != _timers(slot.state) or (
            event.ts - slot.state.saved_ts >= SAVE_EVERY_S
        ):
            new.saved_ts = event.ts
            await self._save(subject, new)
            if events:
                await self._flush(subject, new)
        else:
            slot.state = new  # nothing durable changed: memory only
        self._count(subject, events, new)
        self.eval_seconds.labels(subject=subject).observe(time.perf_counter() - started)
        return ()

    def _definition(self, subject: str) -> SubjectDefinition | None:
        cfg = self.config.subjects.get(subject)
        if cfg is None:
            if subject not in self._ignored:
                self._ignored.add(subject)
                log.warning("observation of an unconfigured subject", extra={"subject": subject})
            return None
        return subjects.definition_of(cfg)

    def _judge(self, definition: SubjectDefinition, state: SubjectState, obs: Observation,
               *, fresh: bool) -> tuple[SubjectState, list[IncidentEvent]]:
        invs: dict[str, inv.InvState] = {}
        events: list[IncidentEvent] = []
        open_now = [n for n, st in state.invariants.items() if st.open is not None]
        for spec in inv.judged(definition.invariants, obs.metrics, open_now):
            before = state.invariants.get(spec.name, inv.InvState())
            res = inv.step(spec, before, inv.sample_of(spec, obs.ts, obs.up, obs.metrics),
                           fresh=fresh, new_incident_id=derive_id(obs.id, "incident", spec.name))
            invs[spec.name] = res.state
            if res.transition is not None:
                events.append(self._event(spec, res, before, obs))
        return SubjectState(last_ts=obs.ts, saved_ts=state.saved_ts, invariants=invs,
                            outbox=events), events

    def _event(self, spec: InvariantSpec, res: inv.Step, before: inv.InvState,
               obs: Observation) -> IncidentEvent:
        a = res.assessment
        value = a.value if a.value is not None else a.limit
        if res.transition == "open":
            assert res.state.open is not None
            return IncidentOpened(
                id=follow_id(obs, "opened", spec.name),
                incident_id=res.state.open.incident_id,
                invariant=spec.name,
                summary=_summary(spec, a, obs),
                value=value,
                threshold=a.limit,
                symptoms=dict(obs.metrics),
                # Untrusted data for the diagnoser to read, never to obey.
                recent_logs=[line[:MAX_LOG_LINE_CHARS] for line in obs.log_lines[-MAX_LOG_LINES:]],
                severity="critical" if a.down or _far(spec, value, a.limit) else "warning",
                subject=obs.subject,
                causation_id=obs.id,
                producer=self.name,
            )
        assert before.open is not None
        incident_id = before.open.incident_id
        if res.transition == "update":
            return IncidentUpdated(
                id=follow_id(obs, "updated", spec.name),
                incident_id=incident_id,
                invariant=spec.name,
                value=value,
                note=f"{_what(spec)} moved from {before.open.last_value:.4g} to {value:.4g}",
                subject=obs.subject,
                causation_id=obs.id,
                producer=self.name,
            )
        return IncidentResolved(
            id=follow_id(obs, "resolved", spec.name),
            incident_id=incident_id,
            invariant=spec.name,
            reason=(f"{_what(spec)} = {value:.4g}, within {spec.op} {a.clear_limit:.4g} "
                    f"for {spec.for_s:g}s"),
            subject=obs.subject,
            causation_id=obs.id,
            producer=self.name,
        )

    def _count(self, subject: str, events: list[IncidentEvent], state: SubjectState) -> None:
        for e in events:
            if isinstance(e, IncidentOpened):
                self.opened.labels(subject=subject, invariant=e.invariant).inc()
                log.info("incident opened", extra={"subject": subject, "invariant": e.invariant,
                                                   "incident_id": e.incident_id})
            elif isinstance(e, IncidentResolved):
                self.resolved.labels(subject=subject, invariant=e.invariant).inc()
                log.info("incident resolved", extra={"subject": subject,
                                                     "invariant": e.invariant,
                                                     "incident_id": e.incident_id})
        n_open = sum(1 for s in state.invariants.values() if s.open is not None)
        self.open_gauge.labels(subject=subject).set(n_open)


def _what(spec: InvariantSpec) -> str:
    return f"rate of {spec.metric} (/s)" if spec.kind == "rate" else spec.metric


def _far(spec: InvariantSpec, value: float, limit: float) -> bool:
    """Critical when well past the limit (half again), a warning when just past it."""
    if limit == 0:
        return True
    return value >= 1.5 * limit if spec.op == "<" else value <= limit / 1.5


def _summary(spec: InvariantSpec, a: inv.Assessment, obs: Observation) -> str:
    if a.alerting or spec.metric.startswith(inv.ALERT_PREFIX):
        firing = [n for n in spec.alerts if obs.metrics.get(inv.ALERT_PREFIX + n, 0) > 0]
        names = ", ".join(firing) or spec.metric.removeprefix(inv.ALERT_PREFIX)
        return (f"{spec.name} broken on {obs.subject}: Alertmanager reports {names} "
                f"firing ({spec.description})")
    if a.down:
        why = obs.error[:200] or "no answer"
        return f"{obs.subject} is not answering its scrape ({why}); {spec.name} broken"
    assert a.value is not None
    kind = " (learned baseline)" if spec.kind == "baseline" else ""
    return (f"{spec.name} broken on {obs.subject}: {_what(spec)} = {a.value:.4g}, "
            f"should be {spec.op} {a.limit:.4g}{kind}, for {spec.for_s:g}s "
            f"({spec.description})")


ACTOR = Detector
