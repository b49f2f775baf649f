"""May an approval start now? The executor's last word, as a pure function.

actors/executor/actor.py reads the kill switch, the revocation and the mode
with fresh KV `get`s and asks `refusal`; the property tests drive the same
function through interleavings of kills, resumes, revocations, mode changes
and clock steps.
"""

from __future__ import annotations

from typing import NamedTuple

from bus_schemas.governor import KillFlag, parse_revocation
from bus_schemas.messages import MAX_APPROVAL_TTL_S, ExecutionApproved, Mode


class Refusal(NamedTuple):
    """Why a step must not run, or was stopped: `rule` is what a program acts on
    (ExecutionResult.rule, the planner's RULE_ENDINGS), `reason` what a human reads."""

    rule: str
    reason: str


def refusal(approval: ExecutionApproved, *, kill: KillFlag, revoked: bytes | None,
            mode: Mode | None, now: float, resolved_at: float | None = None) -> Refusal | None:
    """Why `approval` must not start at `now`, or None. Fail closed: an unreadable
    or missing kill flag is engaged (kill_state), any revocation value revokes, an
    unset mode executes nothing. `resolved_at`: when the detector resolved the
    incident, if it did (the verifier's record): a fix for a healthy subject is not
    run, so it cannot take credit for a recovery it did not make."""
    if kill.engaged:
        return kill_refusal(kill)
    if revoked is not None:
        return revoke_refusal(revoked)
    if approval.not_after - approval.ts > MAX_APPROVAL_TTL_S:
        return Refusal("approval_expired",
                       f"approval valid for {approval.not_after - approval.ts:.0f}s, more "
                       f"than the {MAX_APPROVAL_TTL_S:g}s any approval may be (not_after)")
    if now > approval.not_after:
        return Refusal("approval_expired",
                       f"approval expired {now - approval.not_after:.1f}s ago (not_after)")
    if mode not in ("approve", "execute"):
        return Refusal("mode", f"mode is {mode or 'unset'}: nothing executes")
    if mode == "approve" and approval.approved_by == "policy":
        return Refusal("mode", "approved by policy, but the mode is now approve: a human "
                       "must approve each execution")
    if resolved_at is not None:
        return Refusal("resolved",
                       f"incident {approval.incident_id} was resolved by the detector "
                       f"{max(0.0, now - resolved_at):.1f}s ago, before this step started: "
                       "not run")
    return None


def kill_refusal(flag: KillFlag) -> Refusal:
    return Refusal("kill", f"kill switch engaged by {flag.by or 'unknown'}" + (
        f": {flag.reason}" if flag.reason else ""))


def revoke_refusal(value: bytes) -> Refusal:
    rev = parse_revocation(value)
    if rev is None:
        return Refusal("revoked", "revoked")
    return Refusal("revoked", f"revoked by {rev.by}" + (f": {rev.reason}" if rev.reason else ""))
