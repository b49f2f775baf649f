"""May an approval start now? The executor's last word, as a pure function.

actors/executor/actor.py reads the kill switch, the revocation and the mode
with fresh KV `get`s and asks `refusal`; the property tests drive the same
function through interleavings of kills, resumes, revocations, mode changes
and clock steps.
"""

from __future__ import annotations

from bus_schemas.governor import KillFlag, parse_revocation
from bus_schemas.messages import MAX_APPROVAL_TTL_S, ExecutionApproved, Mode


def refusal(approval: ExecutionApproved, *, kill: KillFlag, revoked: bytes | None,
            mode: Mode | None, now: float, resolved_at: float | None = None) -> str | None:
    """Why `approval` must not start at `now`, or None. Fail closed: an unreadable
    or missing kill flag is engaged (kill_state), any revocation value revokes, an
    unset mode executes nothing. `resolved_at`: when the detector resolved the
    incident, if it did (the verifier's record): a fix for a healthy subject is not
    run, so it cannot take credit for a recovery it did not make."""
    if kill.engaged:
        return kill_reason(kill)
    if revoked is not None:
        return revoke_reason(revoked)
    if approval.not_after - approval.ts > MAX_APPROVAL_TTL_S:
        return (f"approval valid for {approval.not_after - approval.ts:.0f}s, more than the "
                f"{MAX_APPROVAL_TTL_S:g}s any approval may be (not_after)")
    if now > approval.not_after:
        return f"approval expired {now - approval.not_after:.1f}s ago (not_after)"
    if mode not in ("approve", "execute"):
        return f"mode is {mode or 'unset'}: nothing executes"
    if mode == "approve" and approval.approved_by == "policy":
        return ("approved by policy, but the mode is now approve: a human must approve "
                "each execution")
    if resolved_at is not None:
        return (f"incident {approval.incident_id} was resolved by the detector "
                f"{max(0.0, now - resolved_at):.1f}s ago, before this step started: not run")
    return None


def kill_reason(flag: KillFlag) -> str:
    return f"kill switch engaged by {flag.by or 'unknown'}" + (
        f": {flag.reason}" if flag.reason else "")


def revoke_reason(value: bytes) -> str:
    rev = parse_revocation(value)
    if rev is None:
        return "revoked"
    return f"revoked by {rev.by}" + (f": {rev.reason}" if rev.reason else "")


# Why a step did not run (or was stopped), as the rule a program acts on: each refusal
# and cancellation text of the executor starts with one of these.
_RULES: tuple[tuple[str, str], ...] = (
    ("kill switch", "kill"), ("revoked", "revoked"),
    ("approval valid for", "approval_expired"), ("approval expired", "approval_expired"),
    ("mode is", "mode"), ("approved by policy, but the mode", "mode"),
    ("incident ", "resolved"), ("lost the ledger lease", "lost_lease"),
    ("subject ", "not_configured"), ("no action registry", "registry"),
    ("action ", "registry"),
)


def rule_of(reason: str) -> str:
    """The rule of a refusal or cancellation text (refusal, kill_reason, revoke_reason,
    the executor's own); "params" for a parameter error, "" if none fits."""
    for prefix, rule in _RULES:
        if reason.startswith(prefix):
            return rule
    return "params" if ": bad parameters:" in reason else ""
