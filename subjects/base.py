"""What every managed subject package provides, and nothing about its chaos.

A subject package (subjects/<kind>/) exposes one `SubjectDefinition`:
its registered actions (typed parameters, risk, idempotency, timeout), its
invariants, its runbooks, an observer that turns a scrape into observation
fields, and an action client that calls the subject's remediation endpoints.
Chaos hooks live in the same package but are never imported by an actor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import msgspec

from bus_schemas.errors import MendersError
from bus_schemas.messages import RecommendedAction, Risk


class NoParams(msgspec.Struct, forbid_unknown_fields=True):
    """The parameter Struct of an action that takes none."""


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the executor retries an action that failed, declared with the action.

    Only idempotent actions may retry (a repeated non-idempotent call could double
    its effect), and only failures: a kill, a revocation or a lost lease never
    retries. `not_retryable` lists failure codes (ActionError.code) that say a retry
    cannot help (a refused precondition, bad input)."""

    attempts: int = 1  # tries in all; 1: no retry
    backoff_s: float = 0.5  # before the 2nd try; doubled each time, up to backoff_max_s
    backoff_max_s: float = 5.0
    retry_timeouts: bool = False  # a try that timed out is retried too
    not_retryable: tuple[str, ...] = ("refused", "invalid")

    def backoff(self, tried: int) -> float:
        """The pause after the `tried`-th try failed."""
        return min(self.backoff_s * 2 ** max(tried - 1, 0), self.backoff_max_s)

    def budget_s(self, timeout_s: float) -> float:
        """The longest the whole step can take: every try and every pause."""
        return self.attempts * timeout_s + sum(self.backoff(n) for n in
                                               range(1, self.attempts))


NO_RETRY = RetryPolicy()


@dataclass(frozen=True)
class ActionSpec:
    name: str
    description: str
    params: type[msgspec.Struct]
    risk: Risk
    idempotent: bool
    timeout_s: float = 10.0
    # Takes a member or node out of service while it runs (a restart, a defrag):
    # blast-radius policy counts these per subject.
    disruptive: bool = False
    retry: RetryPolicy = NO_RETRY

    def __post_init__(self) -> None:
        if self.retry.attempts < 1:
            raise ValueError(f"{self.name}: retry.attempts must be >= 1")
        if self.retry.attempts > 1 and not self.idempotent:
            raise ValueError(f"{self.name}: only an idempotent action may retry (a "
                             "repeated call could double its effect)")

    def validate(self, params: dict[str, Any]) -> msgspec.Struct:
        """Raises ActionError naming the bad parameter."""
        try:
            return msgspec.convert(params, self.params)
        except msgspec.ValidationError as exc:
            raise ActionError(f"{self.name}: bad parameters: {exc}") from None

    def json_schema(self) -> dict[str, Any]:
        return msgspec.json.schema(self.params)


class ActionError(MendersError, ValueError):
    """An action failed. `code` classifies it for the retry policy: "refused" (a
    precondition said no), "invalid" (bad input), or "failed"."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


InvariantKind = Literal["threshold", "rate", "baseline"]


class InvariantSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A rule a healthy subject keeps, over one metric of its observations.

    threshold: broken while `metric op threshold` is false for `for_s`;
      holds again once it is true with the hysteresis margin `clear` (e.g.
      break above 250 ms, clear below 200 ms).
    rate: the metric's per-second rate of change over `window_s` must stay below `threshold`.
    baseline: the metric must stay below `factor` x its learned baseline
      (an EWMA over healthy samples) and above `threshold` as a floor.
    `down_breaks`: an observation with up=False counts as broken.
    `alerts`: Alertmanager alerts (by alertname) that report this same condition. While
      one fires the invariant is broken (and opens at once: the alert waited its own
      `for`), so an alert and the metric it fires on are one incident, not two.
    `settle_s`: how long after a cure the metric may still show the trouble. A count
      over a trailing window (leader changes in the last minute) holds again only once
      the window has passed; the verifier waits at least this long, and its stable
      window on top, before it calls a fix failed.
    """

    name: str
    metric: str
    description: str
    kind: InvariantKind = "threshold"
    op: Literal["<", ">"] = "<"  # the healthy direction: metric < threshold
    threshold: float
    clear: float | None = None
    for_s: float = 2.0
    window_s: float = 5.0
    factor: float = 3.0
    down_breaks: bool = False
    alerts: tuple[str, ...] = ()
    settle_s: float = 0.0


class RunbookRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """When `invariant` broke and every `when` condition holds, suspect `hypothesis`.

    `when` maps a metric name to a condition string: ">0.5", "<10", "==0".
    `log_contains` matches substrings of recent log lines (data, not instructions).
    """

    name: str
    invariant: str | None = None  # None: any invariant
    when: dict[str, str] = {}
    log_contains: list[str] = []
    hypothesis: str
    confidence: float
    actions: list[RecommendedAction] = []  # ranked, best first; empty with escalate=True
    escalate: bool = False


class ObserverProtocol(Protocol):
    async def scrape(self) -> dict[str, Any]:
        """Fields for one Observation: up, metrics, log_lines, error."""
        ...

    async def close(self) -> None: ...


class ActionClientProtocol(Protocol):
    async def run(self, action: str, params: dict[str, Any], timeout_s: float) -> str:
        """Call the subject's remediation endpoint; return a detail string or raise."""
        ...

    async def precondition(self, action: str, params: dict[str, Any]) -> str | None:
        """Checked on fresh state right before a disruptive step starts: why it must
        not start now (etcd: another member is down, so quorum would be at risk), or
        None. A client with nothing to check returns None."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class SubjectDefinition:
    kind: str
    actions: dict[str, ActionSpec]
    invariants: tuple[InvariantSpec, ...]
    runbooks: tuple[RunbookRule, ...]
    # Built from the subject's config section (url, log_path, ...).
    make_observer: Callable[[Any], ObserverProtocol]
    make_action_client: Callable[[Any], ActionClientProtocol]
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def invariant(self, name: str) -> InvariantSpec:
        for inv in self.invariants:
            if inv.name == name:
                return inv
        raise KeyError(name)


Check = Callable[[], Awaitable[bool]]
