"""One readable line per event, for `menders tail`, the demo timeline and `menders audit`."""

from __future__ import annotations

import time

from bus_schemas import messages as m


def summary(event: m.Event) -> str:
    match event:
        case m.Observation(up=False, error=err):
            return f"DOWN {err}"
        case m.Observation(metrics=metrics):
            shown = ", ".join(f"{k}={v:g}" for k, v in sorted(metrics.items())[:6])
            return shown
        case m.IncidentOpened(invariant=inv, summary=text):
            return f"{inv}: {text}"
        case m.IncidentUpdated(invariant=inv, value=value, note=note):
            return f"{inv} now {value:g} {note}".rstrip()
        case m.IncidentResolved(invariant=inv, reason=reason):
            return f"{inv}: {reason}"
        case m.IncidentEscalated(reason=reason, attempts=n):
            return f"after {n} attempt(s): {reason}"
        case m.Diagnosis(hypothesis=h, confidence=c, actions=acts, source=src):
            ranked = " > ".join(a.action for a in acts) or "(escalate)"
            return f"[{src} {c:.0%}] {h} -> {ranked}"
        case m.Plan(follows=leader, rationale=why) if leader:
            return f"follows incident {leader[:8]}: {why}"
        case m.Plan(attempt=n, steps=[one]):
            return f"attempt {n}: {one.action}{_params(one.params)}"
        case m.Plan(attempt=n, steps=steps):
            # Several steps: ids and dependencies say the waves.
            return f"attempt {n}: " + ", ".join(
                f"{s.step_id}={s.action}{_params(s.params)}"
                + (f" after {'+'.join(s.depends_on)}" if s.depends_on else "")
                + ("" if s.mode == "sync" else f" [{s.mode}]") for s in steps)
        case m.PlanProgressed(wave=n, waves=total, state=state, steps=ids, detail=d):
            return f"wave {n}/{total} {state.upper()}: " + (d or ", ".join(ids))
        case m.PlanEnded(outcome=outcome, steps=steps, deciding=d):
            why = f" ({d.step_id} {d.action} {d.ended}: {d.detail})" if d else ""
            ok = sum(1 for s in steps if s.ended == "succeeded")
            return f"{outcome.upper()} {ok}/{len(steps)} steps succeeded{why}".rstrip()
        case m.ExecutionApproved(execution_id=xid, step=step, approved_by=by):
            return f"{xid[:8]} {step.action}{_params(step.params)} approved by {by}"
        case m.Decision(outcome=outcome, reason=reason, execution_id=xid, step=step):
            what = f" {step.action}" if step else ""
            return f"{outcome.upper()} {xid[:8]}{what}: {reason}"
        case m.ExecutionStarted(execution_id=xid, action=action):
            return f"{xid[:8]} {action} started"
        case m.ExecutionResult(execution_id=xid, action=action, status=status, detail=d):
            return f"{xid[:8]} {action} {status.upper()} {d}".rstrip()
        case m.Verdict(invariant=inv, passed=ok, reason=reason):
            return f"{'PASS' if ok else 'FAIL'} {inv}: {reason}"
        case m.IncidentParked(obstacle=kind, reason=reason, action=action, retry_at=at):
            when = f"; next try by {time.strftime('%H:%M:%S', time.localtime(at))}" if at else ""
            return f"PARKED ({kind}) {action}: {reason}{when}"
        case m.IncidentRecurring(invariant=inv, count=n, window_s=w, incidents=ids):
            shown = ", ".join(i[:8] for i in ids[-6:])
            return f"RECURRING {inv}: {n} incidents within {w:g}s ({shown})"
        case m.RetryRequested(by=by, reason=reason):
            return f"retry asked by {by}" + (f": {reason}" if reason else "")
        case m.DiagnosisRequested(attempt=n, reason=reason, history=tried):
            done = ", ".join(f"{h.action}:{h.outcome}" for h in tried) or "nothing yet"
            return f"for attempt {n} ({reason}); tried: {done}"
        case m.PolicyChanged(change=change, mode=mode, by=by):
            return f"{change}{' ' + mode if mode else ''} by {by}".strip()
        case m.IncidentSummary(outcome=outcome, summary=text):
            return f"[{outcome}] {text}"
        case m.HumanApproval(execution_id=xid, approved=ok, by=by):
            return f"{xid[:8]} {'approved' if ok else 'denied'} by {by}"
        case m.ControlCommand(command=cmd, mode=mode, execution_id=xid, plan_id=pid, by=by):
            arg = mode or (f"plan {pid[:8]}" if pid else xid[:8])
            return f"{cmd} {arg} by {by}".replace("  ", " ")
        case m.KillReengaged(reason=reason):
            return f"KILL SWITCH RE-ENGAGED: {reason}"
        case m.Heartbeat(actor=a, pid=pid, in_flight=n, handled=h):
            return f"{a} pid={pid} in_flight={n} handled={h}"
        case m.DeadLetter(consumer=c, bus_subject=s, stream_seq=seq, reason=r):
            return f"{c} {s}#{seq}: {r}"
    return ""


def _params(params: dict[str, object]) -> str:
    if not params:
        return ""
    return "(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"


def line(event: m.Event, bus_subject: str = "") -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts)) + f".{int(event.ts % 1 * 1000):03d}"
    kind = m.kind_of(event)
    incident = f" [{event.incident_id[:8]}]" if event.incident_id else ""
    where = bus_subject or event.subject
    return f"{stamp} {kind:<17} {where:<32}{incident} {summary(event)}"
