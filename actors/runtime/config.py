"""menders configuration: one TOML file decoded by msgspec into typed Structs.

Every field has a default, so an empty file (or none) is valid; the governor's
defaults are the closed ones (approve mode, nothing allowed without a human), and
the demo writes its own config that says `execute` and what it allows. A bad
key or value fails with an error that names it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import msgspec

from actors.runtime.redaction import Redactor
from bus_schemas.errors import MendersError
from bus_schemas.messages import MAX_APPROVAL_TTL_S, Mode, Risk


class NatsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = ""  # empty: `menders up` starts the bundled nats-server on loopback
    host: str = "127.0.0.1"
    port: int = 4222
    store_dir: str = ""  # default: <home>/nats
    sync_always: bool = False  # fsync every write: survives OS crashes, much slower
    binary: str = ""  # default: $MENDERS_NATS_SERVER, beside python, then PATH


class RuntimeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    fetch_batch: int = 64
    fetch_timeout_s: float = 0.5
    heartbeat_s: float = 1.0
    max_message_bytes: int = 256 * 1024
    nak_backoff_s: list[float] = msgspec.field(default_factory=lambda: [0.2, 1.0, 3.0, 10.0])
    publish_timeout_s: float = 5.0
    metrics_host: str = "127.0.0.1"
    metrics_base_port: int = 9464  # actor i in catalog.ACTORS serves base + i; 0 disables
    log_level: str = "INFO"


class SupervisorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_restarts: int = 5  # within max_seconds, then `menders up` stops loudly
    max_seconds: float = 60.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0
    stop_timeout_s: float = 10.0


ALLOW_ALL = "*"  # in an allow-list: every action registered for the subject's kind


class GovernorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The closed defaults (DESIGN.md, safety rule 2): a fresh install waits for a human.
    mode: Mode = "approve"  # the initial mode; `menders mode` changes it at run time
    # Per managed subject, the actions the crew may run: a list allows only those, ["*"]
    # every registered action, [] nothing. A subject with no entry at all runs nothing
    # autonomously: every step waits for a human (docs/architecture.md, "governor").
    allow: dict[str, list[str]] = {}
    max_per_subject_per_minute: int = 6
    max_per_minute: int = 20
    action_cooldown_s: float = 5.0
    max_concurrent: int = 2
    # Steps of one plan released at once (a plan may ask fewer with max_parallel).
    max_parallel_steps: int = 4
    # Blast radius: steps that take a member or node out of service (ActionSpec
    # disruptive) in flight at once on one subject. A plan's own wait their turn;
    # another plan's are vetoed (rule blast_radius).
    max_disruptive_per_subject: int = 1
    approval_above: Risk = "low"  # risk strictly above this needs `menders approve`
    approval_timeout_s: float = 600.0
    # An approved execution that no executor has started by then is refused (not_after).
    approval_ttl_s: float = 60.0
    # After not_after + the step's timeout + this, no executor can still be acting on a
    # released step: if none reported, the governor ends it (`expired`) and frees its slot.
    slot_grace_s: float = 30.0

    def __post_init__(self) -> None:
        # msgspec turns this into a ValidationError at `$.governor`, which load() names.
        if not 0 < self.approval_ttl_s <= MAX_APPROVAL_TTL_S:
            raise ValueError(f"governor.approval_ttl_s must be > 0 and <= "
                             f"{MAX_APPROVAL_TTL_S} (every approval expires), "
                             f"got {self.approval_ttl_s}")
        if self.max_parallel_steps < 1 or self.max_disruptive_per_subject < 1:
            raise ValueError("governor.max_parallel_steps and "
                             "governor.max_disruptive_per_subject must be >= 1")
        if self.approval_timeout_s <= 0:
            raise ValueError(f"governor.approval_timeout_s must be > 0, "
                             f"got {self.approval_timeout_s}")


class PlannerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_attempts: int = 3
    escalation_webhook: str = ""
    # The body's shape: menders (documented in docs/architecture.md), alertmanager (an
    # Alertmanager v4 webhook payload), pagerduty (Events API v2: POST it to
    # https://events.pagerduty.com/v2/enqueue) or slack (an incoming-webhook message).
    escalation_format: Literal["menders", "alertmanager", "pagerduty", "slack"] = "menders"
    # pagerduty: the environment variable holding the integration's routing key (the
    # key itself never goes in the config file).
    escalation_routing_key_env: str = "MENDERS_PAGERDUTY_ROUTING_KEY"
    # An incident that followed another's remediation gets this long, after that
    # remediation verified, to resolve by itself before it is planned on its own.
    follow_grace_s: float = 10.0
    # A parked incident (kill switch, observe mode, a rate window...) is tried again after
    # park_retry_s, doubling per park up to park_retry_max_s; a resume or a mode change
    # wakes it at once. Each try is one plan.
    park_retry_s: float = 5.0
    park_retry_max_s: float = 300.0
    # A re-diagnosis the diagnoser never answers: plan from the last diagnosis's leftovers.
    rediagnosis_timeout_s: float = 60.0
    # Escalated and still broken: remind the webhook after this, doubling up to the max.
    reminder_s: float = 600.0
    reminder_max_s: float = 6 * 3600.0
    # An escalated incident re-enters the loop when its value moved by this factor.
    reentry_factor: float = 2.0
    # The same invariant opening recurrence_count times on one subject within
    # recurrence_window_s is one recurring problem: escalated once, still fixed.
    recurrence_count: int = 3
    recurrence_window_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.recurrence_count < 2:
            raise ValueError("planner.max_attempts must be >= 1 and recurrence_count >= 2")
        if not 0 < self.park_retry_s <= self.park_retry_max_s:
            raise ValueError("planner.park_retry_s must be > 0 and <= park_retry_max_s")
        if self.reentry_factor <= 1.0:
            raise ValueError("planner.reentry_factor must be > 1")


class DiagnoserConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The evidence changed (so an action that failed may be tried again) when the set of
    # broken invariants differs, or a symptom named by an invariant or a runbook condition
    # moved by this factor (values under evidence_floor count as evidence_floor).
    evidence_factor: float = 2.0
    evidence_floor: float = 0.01
    # A re-diagnosis looks at the monitor's observations of this many last seconds.
    fresh_window_s: float = 5.0
    fresh_timeout_s: float = 2.0


class VerifierConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    stable_window_s: float = 3.0
    # Counted only while observations arrive: a gap of more than stale_after_s (the
    # monitor or the bus down) pauses it.
    deadline_s: float = 30.0
    stale_after_s: float = 3.0
    # How long, in total, a check waits for missing evidence; then it is inconclusive.
    evidence_wait_s: float = 60.0
    # An incident only an Alertmanager alert opened passes when the alert resolves,
    # which takes the rule's `for` and Alertmanager's group_interval; past this deadline
    # the verdict is inconclusive (never a silent pass, never a failed fix on no word).
    alert_deadline_s: float = 300.0


class ExecutorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # A running step's ledger claim is renewed every lease_s/3; another executor takes
    # it as abandoned after lease_s without a renewal. (A step's timeout is the action
    # registry's, never a default here.)
    lease_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0.5 <= self.lease_s <= 600:
            raise ValueError(f"executor.lease_s must be within 0.5..600 s, not {self.lease_s}")


class SubjectConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kind: str = "webshop"  # a built-in kind or a plugin's (`menders subjects` lists them)
    url: str = "http://127.0.0.1:8080"  # the service; the chaos port is never given here
    log_path: str = ""  # default for an embedded subject: <home>/subjects/<name>/logs/app.log
    scrape_interval_s: float = 1.0
    embedded: bool = True  # `menders up` runs the service itself (the demo subject)
    # The kind's own settings (ratelimiter: nodes, window_s, clients...), kept as a table
    # here and validated by the Struct the kind declares (subjects.validate_options), so
    # this class stays generic across kinds.
    options: dict[str, Any] = {}

    def __post_init__(self) -> None:
        import subjects  # the kind's own Struct; subjects imports nothing of actors

        if self.kind not in subjects.kinds():
            raise ValueError(f"unknown subject kind {self.kind!r}; installed: "
                             f"{', '.join(subjects.kinds())}")
        if self.embedded and not subjects.embeddable(self.kind):
            what = "declared in TOML" if subjects.is_builtin(self.kind) else "a plugin"
            raise ValueError(f"kind {self.kind!r} is {what}: menders cannot start it "
                             "itself; set embedded = false and run the service yourself")
        subjects.validate_options(self.kind, self.options)

    def log_file(self, home: Path, name: str) -> Path | None:
        if self.log_path:
            return Path(self.log_path)
        return home / "subjects" / name / "logs" / "app.log" if self.embedded else None


class LlmConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The Claude diagnoser (used only when ANTHROPIC_API_KEY is set)."""

    model: str = "claude-sonnet-4-6"
    summary_model: str = "claude-haiku-4-5"
    base_url: str = ""  # empty: the SDK's default (or ANTHROPIC_BASE_URL)
    max_turns: int = 6  # model calls per investigation; the last one must diagnose
    max_tokens: int = 2048  # per response
    timeout_s: float = 30.0  # per request
    max_total_tokens: int = 60_000  # input + output over one investigation
    max_wall_s: float = 60.0  # one investigation, model calls and tools together
    # Dollars the model may cost per incident, every diagnosis of it together (the
    # estimate of usage.py's price table); past it, the runbooks answer and the
    # Diagnosis says why. 0: no cap.
    max_usd_per_incident: float = 1.0
    max_retries: int = 2  # the SDK's own retries with backoff (the first layer)
    retry_attempts: int = 1  # whole-call retries after the SDK gave up, then runbooks
    retry_backoff_s: float = 2.0
    tool_timeout_s: float = 3.0  # one investigation query over the bus
    summaries: bool = True  # a one-paragraph summary of each closed incident
    summary_max_tokens: int = 400
    # USD per million tokens; 0: the built-in price of a known model
    # (actors/diagnoser/llm/usage.py).
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0


class RedactionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Your own secret patterns (regular expressions; group 1, if any, is the secret),
    # beside the built-in ones (actors/runtime/redaction.py).
    patterns: list[str] = []

    def __post_init__(self) -> None:
        Redactor(self.patterns)  # a pattern that does not compile names itself

    def redactor(self) -> Redactor:
        return Redactor(self.patterns)


class AlertRoute(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Alerts whose labels all equal `match` (and fully match each `match_re` regex)
    belong to `subject`. The first route that matches wins."""

    subject: str
    match: dict[str, str] = {}
    match_re: dict[str, str] = {}

    def __post_init__(self) -> None:
        if not self.match and not self.match_re:
            raise ValueError(f"route to {self.subject!r}: give match or match_re labels")
        for label, pattern in self.match_re.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"match_re.{label}: {pattern!r} does not compile: "
                                 f"{exc}") from None


class AlertmanagerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The monitor's Alertmanager webhook receiver (docs/architecture.md, "alerts")."""

    listen: str = ""  # "127.0.0.1:9095"; empty: no receiver
    path: str = "/alertmanager"
    # If set, the environment variable holding the bearer token Alertmanager must send
    # (its receiver's http_config.authorization.credentials).
    token_env: str = ""
    # Without a matching route, an alert labelled `menders_subject="<name>"` goes to
    # that subject; any other alert is counted and dropped.
    routes: list[AlertRoute] = []
    # A resolved alert reads 0 this long (so the detector sees it clear), then is dropped.
    keep_resolved_s: float = 600.0
    max_body: int = 1024 * 1024

    def __post_init__(self) -> None:
        if self.listen:
            host, sep, port = self.listen.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"alertmanager.listen: want host:port, got {self.listen!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"alertmanager.path must start with /, got {self.path!r}")


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    home: str = ""  # state directory; default $MENDERS_HOME or ~/.menders
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    governor: GovernorConfig = msgspec.field(default_factory=GovernorConfig)
    planner: PlannerConfig = msgspec.field(default_factory=PlannerConfig)
    diagnoser: DiagnoserConfig = msgspec.field(default_factory=DiagnoserConfig)
    verifier: VerifierConfig = msgspec.field(default_factory=VerifierConfig)
    executor: ExecutorConfig = msgspec.field(default_factory=ExecutorConfig)
    llm: LlmConfig = msgspec.field(default_factory=LlmConfig)
    redaction: RedactionConfig = msgspec.field(default_factory=RedactionConfig)
    alertmanager: AlertmanagerConfig = msgspec.field(default_factory=AlertmanagerConfig)
    subjects: dict[str, SubjectConfig] = msgspec.field(
        default_factory=lambda: {"webshop": SubjectConfig()}
    )

    @property
    def home_dir(self) -> Path:
        return Path(self.home or os.environ.get("MENDERS_HOME") or Path.home() / ".menders")

    @property
    def nats_url(self) -> str:
        return self.nats.url or f"nats://{self.nats.host}:{self.nats.port}"



class ConfigError(MendersError, ValueError):
    pass


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config file: the given path, $MENDERS_CONFIG, or defaults."""
    path = path or os.environ.get("MENDERS_CONFIG")
    if not path:
        return Config()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        return msgspec.toml.decode(data, type=Config)
    except msgspec.ValidationError as exc:
        # msgspec names the key: "Expected `int`, got `str` - at `$.nats.port`"
        raise ConfigError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None

