"""The one catalog of bus subjects, streams, consumers and KV buckets.

nats.conf permissions (bus_schemas.natsconf), provisioning (actors.stack.provision),
decoders (bus_schemas.codec) and docs all follow from these tables; nothing
else spells a bus subject string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bus_schemas import messages as m

ACTORS: tuple[str, ...] = (
    "monitor",
    "detector",
    "diagnoser",
    "planner",
    "governor",
    "executor",
    "verifier",
    "auditor",
)
OPERATOR = "operator"  # the human CLI
ADMIN = "admin"  # provisioning only

PREFIX = "menders"
EVERYTHING = f"{PREFIX}.>"  # what `nats sub 'menders.>'` and `menders tail` show by default

OBS_STREAM = "MENDERS_OBS"
EVENTS_STREAM = "MENDERS_EVENTS"
DLQ_STREAM = "MENDERS_DLQ"
HEARTBEAT_STREAM = "MENDERS_HEARTBEAT"
GOVERNOR_BUCKET = "menders_governor"  # mode, kill switch, revocations, rate windows
EXEC_LEDGER_BUCKET = "menders_exec_ledger"  # the executor's at-most-once claims
PLANNER_BUCKET = "menders_planner"  # plan attempts per incident, survives a planner restart
DETECTOR_BUCKET = "menders_detector"  # open incidents and invariant timers, per subject
VERIFIER_BUCKET = "menders_verifier"  # incident -> subject + invariant, for checks
PARTITION_BUCKET = "menders_partitions"  # which process owns which partition (leases)

# Observations are stored partitioned by subject name: the most detector processes
# that can share the work. A fixed count (as Kafka's partitions), so any number of
# detectors from 1 to this many share it with no configuration; changing it is a
# re-provision (the stream's subject transform and the consumers follow).
OBS_PARTITIONS = 8
# A partition's owner renews its lease every PARTITION_RENEW_S; a process that stops
# renewing (SIGKILLed, partitioned away) loses its leases after PARTITION_LEASE_S,
# the bucket's TTL, enforced by the server's clock alone.
PARTITION_LEASE_S = 5.0
PARTITION_RENEW_S = 1.0
# Actors whose processes share the subjects by those partitions: the detector (one
# consumer per partition) and the monitor (it scrapes its partitions' subjects).
PARTITIONED_ACTORS: tuple[str, ...] = ("detector", "monitor")


@dataclass(frozen=True)
class Stream:
    name: str
    subjects: tuple[str, ...]
    max_age_s: float
    max_bytes: int
    description: str
    max_msgs_per_subject: int = -1
    duplicate_window_s: float = 120.0
    # > 0: a message published on `partition_source` (one '*', the subject name) is
    # stored as "<that subject>.<partition>", the partition chosen by the server's own
    # deterministic mapping partition(n, 1) (see partition_of).
    partitions: int = 0
    partition_source: str = ""

    @property
    def partition_transform(self) -> tuple[str, str] | None:
        """(src, dest) of the stream's subject transform, if partitioned."""
        if not self.partitions:
            return None
        assert self.partition_source.count("*") == 1, self.partition_source
        dest = self.partition_source.replace("*", "{{wildcard(1)}}")
        return self.partition_source, f"{dest}.{{{{partition({self.partitions},1)}}}}"


@dataclass(frozen=True)
class KvBucket:
    name: str
    history: int
    description: str
    ttl_s: float = 0.0  # 0: entries never expire


@dataclass(frozen=True)
class BusSubject:
    pattern: str  # with {subject}/{actor}/{outcome}/... placeholders
    schema: type[m.Event]
    stream: str
    publishers: tuple[str, ...]
    consumers: tuple[str, ...]
    description: str

    @property
    def wildcard(self) -> str:
        """The pattern with each placeholder token replaced by '*'."""
        return ".".join("*" if t.startswith("{") else t for t in self.pattern.split("."))


@dataclass(frozen=True)
class Consumer:
    actor: str
    durable: str
    stream: str
    filter_subjects: tuple[str, ...]
    max_deliver: int = 5
    # Short: a crashed actor's unacked messages come back this soon. Long handlers are
    # kept alive by the runtime's in_progress every ack_wait/3, not by a long ack wait.
    ack_wait_s: float = 10.0
    max_ack_pending: int = 1000
    concurrency: int = 1  # messages handled at once; 1 keeps per-consumer order
    description: str = ""
    # One partition of a partitioned stream: consumed only by the process that holds
    # its lease (actors.runtime.partitions), so N processes share the stream.
    partition: int | None = None
    schemas: tuple[type[m.Event], ...] = field(default=(), compare=False)


STREAMS: tuple[Stream, ...] = (
    Stream(
        OBS_STREAM,
        ("menders.obs.>",),
        max_age_s=15 * 60,
        max_bytes=512 * 1024 * 1024,
        description="Observations: many, short-lived, replaced by fresher ones.",
        duplicate_window_s=30.0,
        partitions=OBS_PARTITIONS,
        partition_source="menders.obs.*",
    ),
    Stream(
        EVENTS_STREAM,
        (
            "menders.incident.>",
            "menders.diagnosis.>",
            "menders.plan.>",
            "menders.decision.>",
            "menders.exec.>",
            "menders.verdict.>",
            "menders.approval",
            "menders.control",
            "menders.kill.>",
            "menders.policy.>",
        ),
        max_age_s=30 * 24 * 3600,
        max_bytes=4 * 1024 * 1024 * 1024,
        description="The incident lifecycle: kept, it is the history operators read.",
    ),
    Stream(
        DLQ_STREAM,
        ("menders.dlq.>",),
        max_age_s=30 * 24 * 3600,
        max_bytes=1024 * 1024 * 1024,
        description="Dead letters: what an actor could not handle, and why.",
    ),
    Stream(
        HEARTBEAT_STREAM,
        ("menders.heartbeat.>",),
        max_age_s=300,
        max_bytes=64 * 1024 * 1024,
        max_msgs_per_subject=1,
        description="The last heartbeat of each actor, for `menders status`.",
        duplicate_window_s=1.0,
    ),
)

_STREAMS = {s.name: s for s in STREAMS}


def stream_named(name: str) -> Stream:
    return _STREAMS[name]


KV_BUCKETS: tuple[KvBucket, ...] = (
    KvBucket(GOVERNOR_BUCKET, 10, "Governor state: mode, kill switch, revocations"),
    KvBucket(EXEC_LEDGER_BUCKET, 5, "Executor claims: each execution's effect at most once",
             ttl_s=30 * 24 * 3600),
    KvBucket(PLANNER_BUCKET, 5, "Planner state: plan attempts and alternatives per incident",
             ttl_s=30 * 24 * 3600),
    KvBucket(DETECTOR_BUCKET, 5, "Detector state: open incidents, invariant timers"),
    KvBucket(VERIFIER_BUCKET, 1, "Verifier: each incident's subject and invariant",
             ttl_s=7 * 24 * 3600),
    KvBucket(PARTITION_BUCKET, 1, "Partition leases: which process owns which partition",
             ttl_s=PARTITION_LEASE_S),
)

BUS_SUBJECTS: tuple[BusSubject, ...] = (
    BusSubject("menders.obs.{subject}", m.Observation, OBS_STREAM,
               ("monitor",), ("detector", "verifier"), "One snapshot of a subject's symptoms."),
    BusSubject("menders.incident.{subject}.opened", m.IncidentOpened, EVENTS_STREAM,
               ("detector",), ("diagnoser", "verifier", "auditor"),
               "An invariant broke."),
    BusSubject("menders.incident.{subject}.updated", m.IncidentUpdated, EVENTS_STREAM,
               ("detector",), ("planner", "auditor"), "An open incident's value moved."),
    BusSubject("menders.incident.{subject}.resolved", m.IncidentResolved, EVENTS_STREAM,
               ("detector",), ("planner", "verifier", "auditor", "diagnoser"),
               "The invariant holds again."),
    BusSubject("menders.incident.{subject}.escalated", m.IncidentEscalated, EVENTS_STREAM,
               ("planner",), ("auditor", "diagnoser"), "Handed to a human."),
    BusSubject("menders.incident.{subject}.parked", m.IncidentParked, EVENTS_STREAM,
               ("planner",), ("auditor", OPERATOR),
               "Held back by an obstacle that is not the fix's fault (kill switch, mode, "
               "a rate window); planned again when it lifts."),
    BusSubject("menders.incident.{subject}.recurring", m.IncidentRecurring, EVENTS_STREAM,
               ("planner",), ("auditor", OPERATOR),
               "The same invariant keeps breaking on the subject: one recurring problem."),
    BusSubject("menders.incident.{subject}.retry", m.RetryRequested, EVENTS_STREAM,
               (OPERATOR,), ("planner", "auditor"),
               "A human asks the crew to work an (escalated) incident again."),
    BusSubject("menders.incident.{subject}.summary", m.IncidentSummary, EVENTS_STREAM,
               ("diagnoser",), ("auditor",),
               "A closed incident told in one paragraph (with an LLM key only)."),
    BusSubject("menders.diagnosis.{subject}", m.Diagnosis, EVENTS_STREAM,
               ("diagnoser",), ("planner", "auditor"), "A hypothesis with ranked actions."),
    BusSubject("menders.diagnosis.{subject}.requested", m.DiagnosisRequested, EVENTS_STREAM,
               ("planner",), ("diagnoser", "auditor"),
               "The planner asks for a fresh diagnosis, with what was tried so far."),
    BusSubject("menders.plan.{subject}", m.Plan, EVENTS_STREAM,
               ("planner",), ("governor", "auditor"), "Steps meant to resolve one incident."),
    BusSubject("menders.plan.{subject}.progress", m.PlanProgressed, EVENTS_STREAM,
               ("governor",), ("auditor", OPERATOR),
               "A wave of a plan started or finished (wave N of M)."),
    BusSubject("menders.plan.{subject}.ended", m.PlanEnded, EVENTS_STREAM,
               ("governor",), ("planner", "verifier", "auditor"),
               "Every step of a plan ended: how the plan ended, and which step decided it."),
    BusSubject("menders.exec.approved.{subject}", m.ExecutionApproved, EVENTS_STREAM,
               ("governor",), ("executor", "auditor"),
               "An approved execution: only the governor may publish it."),
    BusSubject("menders.decision.{subject}.{outcome}", m.Decision, EVENTS_STREAM,
               ("governor",), ("auditor",),
               "A veto, a wait for a human, a denial, a revocation, a kill or an expiry, "
               "with its reason."),
    BusSubject("menders.exec.started.{subject}", m.ExecutionStarted, EVENTS_STREAM,
               ("executor",), ("auditor",), "An execution's effect is about to happen."),
    BusSubject("menders.exec.result.{subject}", m.ExecutionResult, EVENTS_STREAM,
               ("executor",), ("governor", "auditor"),
               "How an execution ended."),
    BusSubject("menders.verdict.{subject}", m.Verdict, EVENTS_STREAM,
               ("verifier",), ("planner", "auditor"), "Whether the invariant holds again."),
    BusSubject("menders.approval", m.HumanApproval, EVENTS_STREAM,
               (OPERATOR,), ("governor", "auditor"), "A human's approve or deny."),
    BusSubject("menders.control", m.ControlCommand, EVENTS_STREAM,
               (OPERATOR,), ("governor", "auditor"), "Mode, kill switch, resume, revoke."),
    BusSubject("menders.policy.changed", m.PolicyChanged, EVENTS_STREAM,
               ("governor",), ("planner", "auditor"),
               "The governor applied a resume or a mode change."),
    BusSubject("menders.kill.reengaged", m.KillReengaged, EVENTS_STREAM,
               ("governor",), ("auditor", OPERATOR),
               "The governor undid a kill-switch release that no `menders resume` made."),
    BusSubject("menders.heartbeat.{actor}", m.Heartbeat, HEARTBEAT_STREAM,
               ACTORS, (OPERATOR,), "An actor is alive."),
    BusSubject("menders.dlq.{actor}", m.DeadLetter, DLQ_STREAM,
               ACTORS, ("auditor", OPERATOR), "A message an actor could not handle, and why."),
)


def _by_kind() -> dict[type[m.Event], BusSubject]:
    return {b.schema: b for b in BUS_SUBJECTS}


_SUBJECT_OF = _by_kind()


def bus_subject_of(event: m.Event) -> str:
    """The concrete bus subject an event is published on."""
    return _fill(_SUBJECT_OF[type(event)], {
        "subject": event.subject,
        "actor": getattr(event, "actor", ""),
        "outcome": getattr(event, "outcome", ""),
    })


def subject_for(schema: type[m.Event], **tokens: str) -> str:
    """The concrete bus subject of `schema` for the given placeholder values.

    `subject_for(m.IncidentOpened, subject="webshop")` is
    "menders.incident.webshop.opened"; a missing value is an error, not a wildcard.
    """
    return _fill(_SUBJECT_OF[schema], tokens)


def _fill(spec: BusSubject, values: dict[str, str]) -> str:
    tokens = []
    for token in spec.pattern.split("."):
        if token.startswith("{"):
            value = values.get(token[1:-1], "")
            if not m.SUBJECT_NAME.match(value):
                raise ValueError(f"{spec.schema.__name__}: bad {token} token {value!r}")
            token = value
        tokens.append(token)
    return ".".join(tokens)


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: '*' is one token, a final '>' one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def under(stage: str) -> str:
    """Every bus subject of one stage ("incident", "exec", ...), for tails and subscriptions."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(sorted(STAGES))}")
    bare = f"{PREFIX}.{stage}"
    return bare if any(b.pattern == bare for b in BUS_SUBJECTS) else f"{bare}.>"


def spec_of(schema: type[m.Event]) -> BusSubject:
    return _SUBJECT_OF[schema]


def partition_of(name: str, partitions: int = OBS_PARTITIONS) -> int:
    """The partition nats-server stores `name`'s messages in: its partition(n, ...)
    mapping is FNV-1a (32 bit) of the token, modulo n (tests/test_partitions.py checks
    this against a real server)."""
    h = 0x811C9DC5
    for byte in name.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def stored_subject_of(event: m.Event) -> str:
    """The subject `event` is stored under in its stream (what a consumer sees)."""
    subject = bus_subject_of(event)
    stream = stream_named(_SUBJECT_OF[type(event)].stream)
    if stream.partitions and matches(stream.partition_source, subject):
        return f"{subject}.{partition_of(event.subject, stream.partitions)}"
    return subject


def _stored_filter(spec: BusSubject, partition: int | None) -> str:
    stream = stream_named(spec.stream)
    if not stream.partitions:
        return spec.wildcard
    return f"{spec.wildcard}.{'*' if partition is None else partition}"


def _consumer(actor: str, durable: str, stream: str, schemas: tuple[type[m.Event], ...],
              partition: int | None = None, **kw: object) -> Consumer:
    filters = tuple(_stored_filter(_SUBJECT_OF[s], partition) for s in schemas)
    for s in schemas:
        assert actor in _SUBJECT_OF[s].consumers, (actor, s)
    return Consumer(actor, durable, stream, filters, schemas=schemas,
                    partition=partition, **kw)  # type: ignore[arg-type]


CONSUMERS: tuple[Consumer, ...] = (
    *(_consumer("detector", f"detector_p{p}", OBS_STREAM, (m.Observation,), partition=p,
                max_deliver=3, ack_wait_s=10,
                description=f"Checks invariants on every observation of partition {p}.")
      for p in range(OBS_PARTITIONS)),
    _consumer("verifier", "verifier_obs", OBS_STREAM, (m.Observation,), max_deliver=3,
              ack_wait_s=10, description="Fresh observations for checks in flight."),
    _consumer("verifier", "verifier", EVENTS_STREAM,
              (m.IncidentOpened, m.IncidentResolved, m.PlanEnded),
              # A check awaits its verdict inside the handler: concurrency lets other
              # checks and the IncidentResolved that may pass them run meanwhile.
              concurrency=32, description="Starts a check when a plan succeeded."),
    _consumer("diagnoser", "diagnoser", EVENTS_STREAM, (m.IncidentOpened,),
              ack_wait_s=15, concurrency=4, description="Diagnoses each opened incident."),
    _consumer("diagnoser", "diagnoser_closed", EVENTS_STREAM,
              (m.IncidentResolved, m.IncidentEscalated), ack_wait_s=15, concurrency=2,
              description="Summarises each closed incident (with an LLM key only)."),
    _consumer("diagnoser", "diagnoser_requests", EVENTS_STREAM, (m.DiagnosisRequested,),
              ack_wait_s=15, concurrency=2,
              description="Diagnoses again, on fresh observations, when the planner asks."),
    _consumer("planner", "planner", EVENTS_STREAM,
              (m.IncidentResolved, m.Diagnosis, m.PlanEnded, m.Verdict,
               m.IncidentUpdated, m.PolicyChanged, m.RetryRequested),
              description="Plans, re-plans on failure, parks, escalates."),
    _consumer("governor", "governor", EVENTS_STREAM,
              (m.Plan, m.HumanApproval, m.ControlCommand, m.ExecutionResult),
              description="Judges every plan step against policy."),
    _consumer("executor", "executor", EVENTS_STREAM, (m.ExecutionApproved,),
              concurrency=8, description="Carries out approved executions."),
    _consumer("auditor", "auditor", EVENTS_STREAM,
              tuple(b.schema for b in BUS_SUBJECTS
                    if b.stream == EVENTS_STREAM and "auditor" in b.consumers),
              ack_wait_s=5, max_ack_pending=5000, description="Records the whole lifecycle."),
    _consumer("auditor", "auditor_dlq", DLQ_STREAM, (m.DeadLetter,), ack_wait_s=5,
              description="Records dead letters."),
)


# Durables an earlier layout had, deleted by provisioning: (stream, durable).
RETIRED_CONSUMERS: tuple[tuple[str, str], ...] = ((OBS_STREAM, "detector"),)


def consumers_of(actor: str) -> tuple[Consumer, ...]:
    return tuple(c for c in CONSUMERS if c.actor == actor)





# Actors that read or write the governor's KV bucket, and how.
KV_WRITERS: dict[str, tuple[str, ...]] = {
    GOVERNOR_BUCKET: ("governor",),
    EXEC_LEDGER_BUCKET: ("executor",),
    DETECTOR_BUCKET: ("detector",),
    VERIFIER_BUCKET: ("verifier",),
    PLANNER_BUCKET: ("planner",),
    PARTITION_BUCKET: PARTITIONED_ACTORS,
}
KV_READERS: dict[str, tuple[str, ...]] = {
    GOVERNOR_BUCKET: ("governor", "executor", OPERATOR),
    EXEC_LEDGER_BUCKET: ("executor", OPERATOR),
    DETECTOR_BUCKET: ("detector", OPERATOR),
    # The executor: was the incident resolved before a step starts? (bus_schemas.verifier)
    VERIFIER_BUCKET: ("verifier", "executor", OPERATOR),
    PLANNER_BUCKET: ("planner", OPERATOR),
    PARTITION_BUCKET: (*PARTITIONED_ACTORS, OPERATOR),
}
# Single keys a user may write in a bucket it otherwise only reads: the operator
# engages the kill switch directly, so a kill never waits for the governor.
KV_KEY_WRITERS: dict[tuple[str, str], tuple[str, ...]] = {(GOVERNOR_BUCKET, "kill"): (OPERATOR,)}
# Actors that watch a bucket (ordered push consumers on the KV stream).
KV_WATCHERS: dict[str, tuple[str, ...]] = {GOVERNOR_BUCKET: ("executor", "governor"),
                                           # listing the live members of a partition group
                                           PARTITION_BUCKET: (*PARTITIONED_ACTORS, OPERATOR)}

# Read-only request/reply services (the Claude diagnoser's investigation tools):
# pattern -> (the one responder, the users that may ask).
SERVICES: dict[str, tuple[str, tuple[str, ...]]] = {
    # timeline, incidents, similar (the incident memory)
    "menders.query.audit.>": ("auditor", ("diagnoser", OPERATOR)),
    # observations, logs: what the monitor saw recently, per managed subject
    "menders.query.obs.>": ("monitor", ("diagnoser", OPERATOR)),
}


# The methods of each query service; the reply Structs are in bus_schemas.queries.
QUERY_METHODS: dict[str, tuple[str, ...]] = {
    "auditor": ("timeline", "incidents", "similar"),
    "monitor": ("observations", "logs"),
}


def service_subject(responder: str, method: str) -> str:
    """The concrete bus subject of one method of `responder`'s query service."""
    if method not in QUERY_METHODS[responder]:
        raise ValueError(f"unknown {responder} query {method!r}; "
                         f"known: {', '.join(QUERY_METHODS[responder])}")
    return service_wildcard(responder).removesuffix(">") + method


def service_wildcard(responder: str) -> str:
    """Every method of `responder`'s query service: what the responder subscribes to."""
    return next(p for p, (who, _) in SERVICES.items() if who == responder)


# The first token after the prefix of every bus subject: what `under()` accepts.
STAGES: frozenset[str] = frozenset(
    [b.pattern.split(".")[1] for b in BUS_SUBJECTS]
    + [p.split(".")[1] for p in SERVICES])
