"""Each refusal of the executor names its rule where it is decided, never from its words."""

from __future__ import annotations

import pytest

import subjects
from actors.executor.actor import LOST_LEASE, unrunnable
from actors.executor.admission import Refusal, kill_refusal, refusal, revoke_refusal
from actors.planner.attempts import RULE_ENDINGS
from actors.runtime.config import SubjectConfig
from bus_schemas import messages as m
from bus_schemas.governor import KillFlag, Revocation, encode_revocation

NOW = 1_000.0
RELEASED = KillFlag(engaged=False, by="ana")
SHOP = {"shop": SubjectConfig(kind="webshop")}


def approval(action: str = "recycle_pool", subject: str = "shop", ttl: float = 60.0,
             by: str = "ana", **params: object) -> m.ExecutionApproved:
    return m.ExecutionApproved(
        incident_id="i1", subject=subject, execution_id="e1", plan_id="p1",
        step=m.PlanStep(step_id="s1", action=action, params=params), ts=NOW,
        approved_by=by, not_after=NOW + ttl)


def admit(a: m.ExecutionApproved, **kw: object) -> Refusal | None:
    args: dict[str, object] = dict(kill=RELEASED, revoked=None, mode="execute", now=NOW)
    args.update(kw)
    return refusal(a, **args)  # type: ignore[arg-type]


def test_each_refusal_branch_names_its_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = encode_revocation(Revocation(execution_id="e1", by="ana", reason="wrong fix"))
    got = {
        "kill": admit(approval(), kill=KillFlag(engaged=True, by="ops", reason="drill")),
        "kill (unreadable)": admit(approval(), kill=KillFlag(engaged=True)),
        "revoked": admit(approval(), revoked=wrong),
        "revoked (undecodable)": admit(approval(), revoked=b"?"),
        "too long": admit(approval(ttl=m.MAX_APPROVAL_TTL_S + 60)),
        "expired": admit(approval(), now=NOW + 61),
        "observe": admit(approval(), mode="observe"),
        "unset": admit(approval(), mode=None),
        "policy in approve": admit(approval(by="policy"), mode="approve"),
        "resolved": admit(approval(), resolved_at=NOW - 1),
        "not configured": unrunnable(approval(subject="db"), SHOP),
        "unregistered": unrunnable(approval("format_disk"), SHOP),
        "params": unrunnable(approval("scale_pool", size="huge"), SHOP),
    }

    def broken(_sc: SubjectConfig) -> subjects.SubjectDefinition:
        raise RuntimeError("plugin gone")

    monkeypatch.setattr(subjects, "definition_of", broken)
    got["no registry"] = unrunnable(approval(), SHOP)
    rules = {k: None if v is None else v.rule for k, v in got.items()}
    assert rules == {
        "kill": "kill", "kill (unreadable)": "kill", "revoked": "revoked",
        "revoked (undecodable)": "revoked", "too long": "approval_expired",
        "expired": "approval_expired", "observe": "mode", "unset": "mode",
        "policy in approve": "mode", "resolved": "resolved",
        "not configured": "not_configured", "no registry": "registry",
        "unregistered": "registry", "params": "params",
    }
    # The words are the same as ever (tests and the audit record match on them).
    assert got["kill"] == Refusal("kill", "kill switch engaged by ops: drill")
    assert got["revoked"] == Refusal("revoked", "revoked by ana: wrong fix")
    assert got["revoked (undecodable)"] == Refusal("revoked", "revoked")
    assert got["unset"] == Refusal("mode", "mode is unset: nothing executes")
    assert got["not configured"] == Refusal("not_configured",
                                            "subject 'db' is not configured here")
    assert got["params"] is not None and "scale_pool: bad parameters:" in got["params"].reason
    # The cancellations' own, and every rule is one the planner knows.
    assert kill_refusal(KillFlag(engaged=True, by="ops")).rule == "kill"
    assert revoke_refusal(b"?").rule == "revoked"
    assert LOST_LEASE.rule == "lost_lease"
    assert set(rules.values()) | {LOST_LEASE.rule} <= set(RULE_ENDINGS)


@pytest.mark.parametrize("mode", ["execute", "approve"])
def test_an_approval_that_may_start_is_not_refused(mode: m.Mode) -> None:
    assert admit(approval(), mode=mode) is None
    assert unrunnable(approval("scale_pool", size=4), SHOP) is None
