"""Every message that crosses the bus, as msgspec Structs.

Each message is a tagged Struct (`kind`) that carries the envelope fields of
`Event`. Schema evolution follows msgspec's rules: new fields get defaults,
fields are never renamed or retyped, unknown fields are ignored, so an older
consumer keeps reading a newer producer's messages.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

import msgspec

SCHEMA_VERSION = 1
# A managed subject's name is one bus-subject token: it must never contain
# '.', '*', '>' or whitespace, or wildcards would select the wrong events.
SUBJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

# Ids and action names end up in KV keys (`incident.<id>`, `revoked.<execution_id>`,
# cooldowns by action): each must be one token of safe characters. A payload with any
# other fails to decode, and is dead-lettered by the runtime with the field named,
# instead of failing in a handler on every delivery (found by bench/fuzz_bus.py).
Id = Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
OptionalId = Annotated[str, msgspec.Meta(max_length=128, pattern=r"^[A-Za-z0-9_-]*$")]
Name = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
OptionalName = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9_-]*$")]

Mode = Literal["observe", "approve", "execute"]
Risk = Literal["low", "medium", "high"]


def new_id() -> str:
    return uuid.uuid4().hex


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """The envelope every message carries."""

    id: Id = msgspec.field(default_factory=new_id)
    incident_id: OptionalId = ""  # correlation id: every event of one incident shares it
    causation_id: OptionalId = ""  # the id of the message that caused this one
    producer: str = ""
    ts: float = msgspec.field(default_factory=time.time)
    v: int = SCHEMA_VERSION
    subject: str = ""  # the managed subject, where there is one


# --- observe / detect -------------------------------------------------------


class Observation(Event, tag="observation", frozen=True, kw_only=True):
    up: bool  # the subject answered its scrape
    metrics: dict[str, float] = {}
    log_lines: list[str] = []  # untrusted data, never instructions
    scrape_ms: float = 0.0
    error: str = ""


class IncidentOpened(Event, tag="incident.opened", frozen=True, kw_only=True):
    invariant: str
    summary: str
    value: float
    threshold: float
    symptoms: dict[str, float] = {}
    recent_logs: list[str] = []
    severity: Literal["warning", "critical"] = "critical"


class IncidentUpdated(Event, tag="incident.updated", frozen=True, kw_only=True):
    invariant: str
    value: float
    note: str = ""


class IncidentResolved(Event, tag="incident.resolved", frozen=True, kw_only=True):
    invariant: str
    reason: str


class IncidentEscalated(Event, tag="incident.escalated", frozen=True, kw_only=True):
    invariant: str = ""
    reason: str
    attempts: int = 0


ObstacleKind = Literal["kill", "mode", "limit", "approval", "expired", "other"]


class IncidentParked(Event, tag="incident.parked", frozen=True, kw_only=True):
    """The planner holds an incident back: its step was refused for a reason that is not
    the fix's fault (kill switch, observe mode, a rate window...). No attempt is used;
    it is planned again when the obstacle lifts (or at `retry_at`)."""

    invariant: str = ""
    obstacle: ObstacleKind
    reason: str
    attempt: int = 0  # the attempt that will be retried
    action: OptionalName = ""
    retry_at: float = 0.0  # the planner's next try at the latest (epoch seconds)


class IncidentRecurring(Event, tag="incident.recurring", frozen=True, kw_only=True):
    """The same invariant broke on the same subject again and again within a window:
    one recurring problem for a human, while the crew keeps fixing what is safe."""

    invariant: str
    count: int  # incidents of this invariant on this subject within the window
    window_s: float
    incidents: list[str] = []  # their ids, oldest first
    reason: str = ""


class RetryRequested(Event, tag="incident.retry", frozen=True, kw_only=True):
    """A human asks the planner to work an incident again (`menders retry`)."""

    by: str
    reason: str = ""


class IncidentSummary(Event, tag="incident.summary", frozen=True, kw_only=True):
    """A one-paragraph account of a closed incident, written by a small model."""

    summary: str
    outcome: str = ""  # resolved | escalated: the closing event it summarises
    model: str = ""
    redactions: int = 0  # secret-like strings cut from the timeline the model read


# --- diagnose / plan ----------------------------------------------------------


StepMode = Literal["sync", "async", "fire_and_forget"]


class RecommendedStep(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a multi-step remedy; `id` is local to the remedy."""

    id: Id
    action: Name
    params: dict[str, Any] = {}
    depends_on: list[Id] = []
    mode: StepMode = "sync"


class RecommendedAction(msgspec.Struct, frozen=True, kw_only=True):
    """One remedy: a single action, or (with `steps`) a plan of several whose name is
    `action` (e.g. "nospace_repair"); either way, one alternative tried as one attempt."""

    action: Name
    params: dict[str, Any] = {}
    rationale: str = ""
    steps: list[RecommendedStep] = []
    max_parallel: int = 0  # for a multi-step remedy; 0: the governor's default


class Diagnosis(Event, tag="diagnosis", frozen=True, kw_only=True):
    invariant: str
    hypothesis: str
    evidence: list[str] = []
    confidence: float = 0.0
    actions: list[RecommendedAction] = []  # ranked, best first
    source: str = "runbook"  # runbook | claude | claude->runbook fallback
    escalate: bool = False  # the diagnoser judges this beyond the crew's actions
    # The DiagnosisRequested this answers ("" for the first diagnosis of an opened
    # incident): the planner ignores an answer to a request it no longer waits for.
    request_id: OptionalId = ""
    redactions: int = 0  # secret-like strings cut from what the model saw (never them)
    cost_usd: float = 0.0  # the model's estimated cost for this diagnosis
    tokens: int = 0  # the model's tokens for it (input, output and cache together)
    symptoms: dict[str, float] = {}  # what the diagnosis was made on (fresh ones on a request)


class AttemptRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt that ran on an incident: what was done, how it ended, what it changed."""

    attempt: int
    action: Name
    params: dict[str, Any] = {}
    outcome: str  # verdict_failed | failed | timed_out | unknown | verified_elsewhere ...
    reason: str = ""  # the verdict's or the result's words
    symptoms_before: dict[str, float] = {}  # those the diagnosis that chose it was made on
    symptoms_after: dict[str, float] = {}  # those the next diagnosis was made on, once known


class DiagnosisRequested(Event, tag="diagnosis.requested", frozen=True, kw_only=True):
    """The planner asks for a fresh diagnosis of an open incident, on fresh observations,
    with the record of what was tried (after a failed attempt, or a human's retry)."""

    invariant: str
    reason: str  # why a fresh look is needed
    attempt: int  # the attempt the answer will be planned as
    history: list[AttemptRecord] = []
    symptoms: dict[str, float] = {}  # the last known, if the monitor cannot answer
    excluded: list[str] = []  # actions a human (or policy) said no to on this incident


class PlanStep(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a plan. Waves: a step's wave is one more than its dependencies'
    deepest (roots are wave 1). A `sync` step holds every later wave until it
    succeeded; an `async` one holds only its own dependents, and the plan ends after
    it; a `fire_and_forget` one holds nothing, may not be depended on nor be
    disruptive, and its failure does not fail the plan. `risk`, `idempotent`,
    `timeout_s`, `disruptive` and `attempts` are the registry's word once the
    governor approved the step (it takes the stricter of claim and registry)."""

    step_id: Id
    action: Name
    params: dict[str, Any] = {}
    depends_on: list[Id] = []
    risk: Risk = "low"
    idempotent: bool = True
    timeout_s: float = 10.0  # per try
    mode: StepMode = "sync"
    disruptive: bool = False  # takes a member or node out of service while it runs
    attempts: int = 1  # tries the executor may make (the action's retry policy)
    budget_s: float = 0.0  # every try with its backoff; 0: timeout_s


class Plan(Event, tag="plan", frozen=True, kw_only=True):
    plan_id: Id
    invariant: str
    attempt: int  # 1 for the first plan of an incident
    steps: list[PlanStep]
    rationale: str = ""
    # Set (with no steps) when this incident joins the remediation already under way
    # for another incident of the same subject with the same action: one cause, one fix.
    follows: str = ""
    max_parallel: int = 0  # steps of this plan released at once; 0: the governor's default


# --- govern / execute / verify ---------------------------------------------------


MAX_APPROVAL_TTL_S = 3600.0  # the longest an approval may stay actionable


class ExecutionApproved(Event, tag="exec.approved", frozen=True, kw_only=True):
    execution_id: Id
    plan_id: Id
    step: PlanStep
    approved_by: str = "policy"  # policy | the human who approved
    # Required and bounded (MAX_APPROVAL_TTL_S after `ts`): every approval expires, and
    # an executor refuses one past it.
    not_after: float


# expired: released, but no executor reported on it before its slot ran out.
# skipped: never released because a step it needed did not succeed (fail-fast).
DecisionOutcome = Literal["vetoed", "awaiting_approval", "denied", "revoked", "killed",
                          "expired", "skipped"]
# Which rule decided, in one word a program can act on (the reason says it for people).
# Governor: kill, mode, registry, params, allow_list, approval, concurrency, rate, cooldown,
# blast_radius, dag, fire_and_forget, dependency, denied, approval_timeout, revoked, expired.
# Executor (skipped/cancelled results): kill, revoked, approval_expired, mode, resolved,
# precondition, registry, params, lost_lease, not_configured.
Rule = str


class Decision(Event, tag="decision", frozen=True, kw_only=True):
    """Every governor decision that is not an approval (approvals are ExecutionApproved)."""

    outcome: DecisionOutcome
    reason: str
    plan_id: OptionalId = ""
    execution_id: OptionalId = ""
    step: PlanStep | None = None
    # True when this Decision is the step's end: it was never released, so no
    # ExecutionResult will follow (vetoed, denied, revoked or expired before release).
    # A `killed` or `revoked` Decision about a released step leaves ending it to the
    # executor's ExecutionResult.
    ends_step: bool = False
    rule: Rule = ""


class ExecutionStarted(Event, tag="exec.started", frozen=True, kw_only=True):
    execution_id: Id
    plan_id: Id
    action: Name


ExecutionStatus = Literal["succeeded", "failed", "timed_out", "cancelled", "unknown", "skipped"]


class ExecutionResult(Event, tag="exec.result", frozen=True, kw_only=True):
    execution_id: Id
    plan_id: Id
    action: Name
    status: ExecutionStatus
    detail: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    rule: Rule = ""  # for skipped and cancelled: the rule that stopped it
    tries: int = 1  # how many times the action was called (its retry policy); 0: never


WaveState = Literal["started", "finished"]


class PlanProgressed(Event, tag="plan.progress", frozen=True, kw_only=True):
    """A wave of a plan started or finished (the governor's view, for people)."""

    plan_id: Id
    wave: int  # 1-based
    waves: int
    state: WaveState
    steps: list[str]  # the wave's step ids
    detail: str = ""  # per step: "<id> <action>: <how it ended>"


PlanOutcome = Literal["succeeded", "failed", "blocked"]


class StepEnding(msgspec.Struct, frozen=True, kw_only=True):
    step_id: Id
    action: Name
    params: dict[str, Any] = {}
    mode: StepMode = "sync"
    ended: str  # succeeded, or a Decision outcome, or an ExecutionStatus
    rule: Rule = ""
    detail: str = ""
    released: bool = False  # an executor got it (an ExecutionResult ended it)


class PlanEnded(Event, tag="plan.ended", frozen=True, kw_only=True):
    """Every step of a plan ended (the governor's word). `succeeded`: every step but
    fire-and-forget ones succeeded; `failed`: a released step did not; `blocked`: a
    step was never released (vetoed, denied, revoked, expired). `deciding` is the first
    step that did not succeed, which says why."""

    plan_id: Id
    outcome: PlanOutcome
    steps: list[StepEnding]
    deciding: StepEnding | None = None
    started_at: float = 0.0  # the first released step's start (0: none ran)
    finished_at: float = 0.0


Recovery = Literal["after", "before", ""]


class Verdict(Event, tag="verdict", frozen=True, kw_only=True):
    plan_id: Id
    invariant: str
    passed: bool  # the invariant holds again (whoever made it hold)
    reason: str
    # Who gets the credit: "after", broken when the step started and held after it
    # finished (the fix worked); "before", it had recovered before the step started or
    # finished (healthy, but not thanks to the fix); "" when it did not recover.
    recovered: Recovery = ""
    # No judgement was possible: the observations stopped (monitor or bus down) and
    # did not come back in time. Neither a pass nor a failed fix.
    inconclusive: bool = False


# --- humans and control -----------------------------------------------------------


class HumanApproval(Event, tag="approval", frozen=True, kw_only=True):
    execution_id: Id
    approved: bool
    by: str = "operator"
    reason: str = ""


class ControlCommand(Event, tag="control", frozen=True, kw_only=True):
    command: Literal["mode", "kill", "resume", "revoke"]
    mode: Mode | None = None
    execution_id: OptionalId = ""
    plan_id: OptionalId = ""  # revoke a whole plan: its running steps cancelled, no new wave
    by: str = "operator"
    reason: str = ""


class PolicyChanged(Event, tag="policy.changed", frozen=True, kw_only=True):
    """The governor applied a change of policy (a resume, a mode): what was held back
    may be planned again."""

    change: Literal["resume", "mode"]
    mode: Mode | None = None
    by: str = ""
    reason: str = ""


class KillReengaged(Event, tag="kill.reengaged", frozen=True, kw_only=True):
    """The governor found the kill switch released (or deleted) without its own
    `resume` and engaged it again: releasing is the governor's alone, and audited."""

    reason: str  # what the governor found, and what it did
    found_by: str = ""  # the `by` of the flag it undid ("" if the key was deleted)
    found_revision: int = 0  # the kill key's revision it undid (0: deleted or missing)


# --- runtime ---------------------------------------------------------------------


class Heartbeat(Event, tag="heartbeat", frozen=True, kw_only=True):
    actor: str
    pid: int
    started_at: float
    in_flight: int = 0
    handled: int = 0
    metrics_port: int = 0
    # Age of the oldest message a handler holds: what a stuck consumer shows while
    # the process itself still beats.
    oldest_in_flight_s: float = 0.0
    # The partitions of a partitioned stream this process consumes (the detector).
    partitions: tuple[int, ...] = ()


class DeadLetter(Event, tag="dead_letter", frozen=True, kw_only=True):
    actor: str
    consumer: str
    bus_subject: str
    stream_seq: int  # the original stays in its stream: this is where to find it
    deliveries: int
    reason: str
    payload_bytes: int
    payload_head: str  # the first bytes, for a human reading `nats sub`


ALL_MESSAGES: tuple[type[Event], ...] = (
    Observation,
    IncidentOpened,
    IncidentUpdated,
    IncidentResolved,
    IncidentEscalated,
    IncidentParked,
    IncidentRecurring,
    RetryRequested,
    IncidentSummary,
    Diagnosis,
    DiagnosisRequested,
    Plan,
    ExecutionApproved,
    Decision,
    ExecutionStarted,
    ExecutionResult,
    PlanProgressed,
    PlanEnded,
    Verdict,
    HumanApproval,
    ControlCommand,
    PolicyChanged,
    KillReengaged,
    Heartbeat,
    DeadLetter,
)


def kind_of(event: Event | type[Event]) -> str:
    """The `kind` tag of an event or an event class: the one way to name a kind."""
    cls = event if isinstance(event, type) else type(event)
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag

# The kinds that belong to one incident: each carries its incident_id, which keys the
# actors' state (a payload without one is dead-lettered at admission, never handled).
INCIDENT_SCOPED: frozenset[type[Event]] = frozenset({
    IncidentOpened, IncidentUpdated, IncidentResolved, IncidentEscalated, IncidentParked,
    IncidentRecurring, RetryRequested, IncidentSummary, Diagnosis, DiagnosisRequested, Plan,
    PlanProgressed, PlanEnded, ExecutionApproved, ExecutionStarted, ExecutionResult, Verdict,
})
