"""The governor's policy, as pure functions: no bus, no clock, no I/O.

`judge` decides one plan step against the mode, the kill switch, the action
registry, the allow-list and the usage windows; the DAG helpers order a plan's
steps. The governor feeds them state read from its KV bucket and `now`, so
every rule here is unit-testable without a nats-server.

Choices worth knowing:
- Rate limits, cooldowns and concurrency *veto* (they never defer): the
  reason says which limit, and the planner, which hears every Decision, can
  move on to its next alternative or try again later. A deferred step would
  hold a plan open invisibly.
- The registry, not the plan, is the authority on risk, idempotency and
  timeout: a plan may claim a *higher* risk (we take the maximum) or that an
  idempotent action is not idempotent (we take the conservative AND), never less.
- The allow-list: a subject's explicit list allows only its actions (`"*"`:
  every registered one, `[]`: none, even with a human's approval). A subject
  with no entry at all is not forbidden but unattended: every step waits for a
  human, so a fresh install runs nothing on its own yet can be operated.
- Limits are checked when an execution is released (on a human approval too),
  not when it starts to wait for a human: that is when they matter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from actors.runtime.config import ALLOW_ALL, GovernorConfig
from bus_schemas.messages import Mode, PlanStep, Risk
from subjects.base import ActionError, ActionSpec

RISK_ORDER: dict[Risk, int] = {"low": 0, "medium": 1, "high": 2}
RATE_WINDOW_S = 60.0


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """One released execution, counted against the per-minute windows."""

    execution_id: str
    subject: str
    action: str
    at: float


class Slot(msgspec.Struct, frozen=True, kw_only=True):
    """An execution in flight: freed by its ExecutionResult or, if that never
    comes (no executor picked it up), at `until`, after which no executor may
    still be acting on it (it refuses approvals past not_after)."""

    subject: str
    action: str
    plan_id: str = ""
    incident_id: str = ""
    until: float
    disruptive: bool = False  # counted by the blast-radius rule while in flight


class Usage(msgspec.Struct, kw_only=True):
    """Rate windows, in-flight slots and cooldowns (KV key `limits`)."""

    grants: list[Grant] = []
    in_flight: dict[str, Slot] = {}
    last_run: dict[str, float] = {}  # "<subject>/<action>" -> time of the last release
    # "<subject>/<action>" -> the plan of that release: a plan's own steps (defragment
    # m1, m2, m3) are not each other's cooldown; the cooldown is between attempts.
    last_plan: dict[str, str] = {}


def cooldown_key(subject: str, action: str) -> str:
    return f"{subject}/{action}"


def prune(usage: Usage, now: float, keep_s: float) -> Usage:
    """Forget what can no longer matter (old grants and cooldowns). Expired slots stay:
    the governor's expiry ends their step (an `expired` Decision) and then frees them;
    they no longer count against any limit."""
    return Usage(
        grants=[g for g in usage.grants if g.at > now - RATE_WINDOW_S],
        in_flight=dict(usage.in_flight),
        last_run={k: t for k, t in usage.last_run.items() if t > now - keep_s},
        last_plan={k: p for k, p in usage.last_plan.items()
                   if usage.last_run.get(k, 0.0) > now - keep_s},
    )


def record_release(usage: Usage, execution_id: str, step: PlanStep, subject: str,
                   now: float, slot: Slot) -> Usage:
    grants = [g for g in usage.grants if g.execution_id != execution_id]
    grants.append(Grant(execution_id=execution_id, subject=subject, action=step.action, at=now))
    key = cooldown_key(subject, step.action)
    return Usage(
        grants=grants,
        in_flight={**usage.in_flight, execution_id: slot},
        last_run={**usage.last_run, key: now},
        last_plan={**usage.last_plan, key: slot.plan_id},
    )


def free_slot(usage: Usage, execution_id: str) -> Usage:
    in_flight = {k: s for k, s in usage.in_flight.items() if k != execution_id}
    return Usage(grants=usage.grants, in_flight=in_flight, last_run=usage.last_run,
                 last_plan=usage.last_plan)


Outcome = Literal["approve", "await_human", "veto"]


@dataclass(frozen=True)
class Judgement:
    outcome: Outcome
    reason: str
    step: PlanStep  # normalised by the registry when the action is registered
    rule: str = ""  # which rule decided (bus_schemas.messages.Rule)


def is_disruptive(step: PlanStep, actions: Mapping[str, ActionSpec]) -> bool:
    """The plan's word or the registry's: either one makes a step count for blast radius."""
    spec = actions.get(step.action)
    return step.disruptive or (spec is not None and spec.disruptive)


def normalise(step: PlanStep, spec: ActionSpec) -> PlanStep:
    """The registry's word, or the plan's where it is stricter. The retry policy is the
    registry's alone, and only an idempotent step retries."""
    risk = step.risk if RISK_ORDER[step.risk] > RISK_ORDER[spec.risk] else spec.risk
    idempotent = spec.idempotent and step.idempotent
    retry = spec.retry if idempotent else msgspec.structs.replace(spec.retry, attempts=1)
    return msgspec.structs.replace(
        step, risk=risk, idempotent=idempotent, timeout_s=spec.timeout_s,
        disruptive=is_disruptive(step, {spec.name: spec}), attempts=retry.attempts,
        budget_s=retry.budget_s(spec.timeout_s))


def static_problem(step: PlanStep, *, subject: str, kind: str,
                   actions: Mapping[str, ActionSpec],
                   cfg: GovernorConfig) -> tuple[str, str] | None:
    """(rule, reason) if the step could never run here, whatever the moment: its action
    is not registered, its parameters are bad, or the allow-list forbids it. The
    governor asks this of every step of a plan before the first one starts."""
    spec = actions.get(step.action)
    if spec is None:
        known = ", ".join(sorted(actions)) or "none"
        return "registry", (f"action {step.action!r} is not registered for subject kind "
                            f"{kind!r} (registered: {known})")
    try:
        spec.validate(step.params)
    except ActionError as exc:
        return "params", str(exc)
    allowed = cfg.allow.get(subject)
    if allowed is not None and ALLOW_ALL not in allowed and step.action not in allowed:
        return "allow_list", f"action {step.action!r} is not in the allow-list of {subject!r}"
    return None


def judge(
    step: PlanStep,
    *,
    subject: str,
    kind: str,
    actions: Mapping[str, ActionSpec],
    cfg: GovernorConfig,
    mode: Mode,
    kill_engaged: bool,
    usage: Usage,
    now: float,
    execution_id: str,
    human_approved: bool = False,
    plan_id: str = "",
) -> Judgement:
    """One step's fate. Checks run cheapest-to-explain first; the first failing one wins."""

    def veto(reason: str, rule: str, s: PlanStep = step) -> Judgement:
        return Judgement("veto", reason, s, rule)

    if kill_engaged:
        return veto("kill switch engaged", "kill")
    if mode == "observe":
        return veto("observe mode: nothing executes", "mode")
    problem = static_problem(step, subject=subject, kind=kind, actions=actions, cfg=cfg)
    if problem is not None:
        return veto(problem[1], problem[0])
    allowed = cfg.allow.get(subject)
    norm = normalise(step, actions[step.action])
    if not human_approved:
        if mode == "approve":
            return Judgement("await_human", "approve mode: a human must approve", norm,
                             "mode")
        if allowed is None:  # nobody said what may run here unattended: a human decides
            return Judgement("await_human", f"no allow-list entry for {subject!r}, so "
                             f"nothing runs on it without a human (allow actions under "
                             f'[governor.allow], e.g. {subject} = ["{step.action}"] or '
                             f'["{ALLOW_ALL}"])', norm, "allow_list")
        if RISK_ORDER[norm.risk] > RISK_ORDER[cfg.approval_above]:
            return Judgement("await_human", f"risk {norm.risk} is above "
                             f"{cfg.approval_above}: a human must approve", norm, "approval")
    limit = limit_breached(usage, subject, step.action, cfg, now, execution_id,
                           plan_id=plan_id, disruptive=norm.disruptive)
    if limit:
        return veto(limit[1], limit[0], norm)
    who = "a human" if human_approved else "policy"
    why = f"approved by {who} in {mode} mode, risk {norm.risk}"
    return Judgement("approve", why, norm)


def limit_breached(usage: Usage, subject: str, action: str, cfg: GovernorConfig, now: float,
                   execution_id: str, *, plan_id: str = "",
                   disruptive: bool = False) -> tuple[str, str] | None:
    """(rule, reason) if a release would break a limit, else None.

    `execution_id`'s own entries are ignored, so judging a step again (a
    redelivered plan after a crash) does not count it against itself.
    """
    flying = {k: s for k, s in usage.in_flight.items() if s.until > now and k != execution_id}
    if len(flying) >= cfg.max_concurrent:
        return "concurrency", (f"concurrency limit: {len(flying)} executions in flight "
                               f"(max {cfg.max_concurrent})")
    out_of_service = [s for s in flying.values() if s.disruptive and s.subject == subject]
    if disruptive and len(out_of_service) >= cfg.max_disruptive_per_subject:
        busy = ", ".join(sorted({s.action for s in out_of_service}))
        return "blast_radius", (f"blast radius: {len(out_of_service)} disruptive step(s) "
                                f"already in flight on {subject!r} ({busy}; max "
                                f"{cfg.max_disruptive_per_subject})")
    recent = [g for g in usage.grants
              if g.at > now - RATE_WINDOW_S and g.execution_id != execution_id]
    per_subject = sum(1 for g in recent if g.subject == subject)
    if per_subject >= cfg.max_per_subject_per_minute:
        return "rate", (f"rate limit: {per_subject} executions on {subject!r} in the last "
                        f"minute (max {cfg.max_per_subject_per_minute})")
    if len(recent) >= cfg.max_per_minute:
        return "rate", (f"rate limit: {len(recent)} executions in the last minute "
                        f"(max {cfg.max_per_minute})")
    key = cooldown_key(subject, action)
    last = usage.last_run.get(key)
    own = any(g.execution_id == execution_id for g in usage.grants) or (
        bool(plan_id) and usage.last_plan.get(key) == plan_id)
    if last is not None and not own and now - last < cfg.action_cooldown_s:
        return "cooldown", (f"cooldown: {action!r} on {subject!r} ran {now - last:.1f}s "
                            f"ago (cooldown {cfg.action_cooldown_s:g}s)")
    return None


# --- plan DAG -----------------------------------------------------------------------


def dag_problems(steps: Sequence[PlanStep]) -> dict[str, str]:
    """Steps that can never run, with why: duplicate ids, unknown dependencies, cycles."""
    problems: dict[str, str] = {}
    ids = [s.step_id for s in steps]
    for sid in {i for i in ids if ids.count(i) > 1}:
        problems[sid] = f"duplicate step id {sid!r}"
    by_id = {s.step_id: s for s in steps}
    for s in steps:
        missing = [d for d in s.depends_on if d not in by_id]
        if missing and s.step_id not in problems:
            problems[s.step_id] = f"depends on unknown step(s) {', '.join(missing)}"
    # Kahn's algorithm: whatever is never freed sits on (or behind) a cycle.
    remaining = {s.step_id: set(s.depends_on) for s in steps if s.step_id not in problems}
    done: set[str] = set()
    while True:
        free = [sid for sid, deps in remaining.items() if deps <= done]
        if not free:
            break
        for sid in free:
            done.add(sid)
            del remaining[sid]
    for sid in remaining:
        problems[sid] = "dependency cycle"
    return problems

