"""How a plan's steps run in waves, as pure functions (no bus, no clock).

A step's wave is one more than its deepest dependency's (roots are wave 1). Modes:

- `sync`: every later wave waits until it succeeded; if it did not, they never start.
- `async`: runs beside its wave and holds only its own dependents; the plan ends
  after it ended, like every other step.
- `fire_and_forget`: holds nothing, may not be depended on nor be disruptive, and its
  failure fails nothing.

The governor asks `startable` which undecided steps may be judged now, `doomed` which
can never start (reported `skipped`, rule `dependency`), and `structure_problems`
whether the plan may run at all (it judges the whole plan before its first step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bus_schemas.messages import PlanStep

SUCCEEDED = "succeeded"
WAITING = "waiting"


def wave_of(steps: Sequence[PlanStep]) -> dict[str, int]:
    """Each step's wave. Steps on a cycle or behind an unknown dependency get 0."""
    by_id = {s.step_id: s for s in steps}
    waves: dict[str, int] = {}
    visiting: set[str] = set()

    def depth(sid: str) -> int:
        if sid in waves:
            return waves[sid]
        s = by_id.get(sid)
        if s is None or sid in visiting:
            return -1
        visiting.add(sid)
        deps = [depth(d) for d in s.depends_on]
        visiting.discard(sid)
        waves[sid] = -1 if any(d < 0 for d in deps) else 1 + max(deps, default=0)
        return waves[sid]

    return {s.step_id: max(depth(s.step_id), 0) for s in steps}


def structure_problems(steps: Sequence[PlanStep],
                       disruptive: Mapping[str, bool]) -> dict[str, tuple[str, str]]:
    """step id -> (rule, reason) for the mode rules: a fire-and-forget step may not be
    depended on (nothing may wait on a step whose failure fails nothing) nor be
    disruptive (`disruptive`: the registry's word, by step id)."""
    ff = {s.step_id for s in steps if s.mode == "fire_and_forget"}
    out: dict[str, tuple[str, str]] = {}
    for s in steps:
        if s.step_id in ff and disruptive.get(s.step_id, s.disruptive):
            out[s.step_id] = ("fire_and_forget", f"step {s.step_id!r} ({s.action}) takes a "
                              f"member out of service: it may not be fire-and-forget")
        on_ff = [d for d in s.depends_on if d in ff]
        if on_ff and s.step_id not in out:
            out[s.step_id] = ("fire_and_forget", f"step {s.step_id!r} depends on "
                              f"fire-and-forget step {on_ff[0]!r}, which holds nothing")
    return out


def _holders(steps: Sequence[PlanStep], waves: Mapping[str, int],
             s: PlanStep) -> list[str]:
    """What must succeed before `s` starts: its dependencies and every sync step of an
    earlier wave (a fire-and-forget step waits for nothing but its dependencies)."""
    if s.mode == "fire_and_forget":
        return list(s.depends_on)
    earlier_sync = [o.step_id for o in steps if o.mode == "sync" and o.step_id != s.step_id
                    and waves[o.step_id] < waves[s.step_id]]
    return list(dict.fromkeys([*s.depends_on, *earlier_sync]))


def startable(steps: Sequence[PlanStep], status: Mapping[str, str]) -> list[PlanStep]:
    """Waiting steps whose holders all succeeded, in plan order."""
    waves = wave_of(steps)
    return [s for s in steps if status.get(s.step_id, WAITING) == WAITING
            and all(status.get(h) == SUCCEEDED for h in _holders(steps, waves, s))]


def doomed(steps: Sequence[PlanStep], status: Mapping[str, str]) -> dict[str, str]:
    """Waiting steps that can never start, with why: a holder ended without success
    (directly, or because it was doomed itself)."""
    waves = wave_of(steps)
    ended = {sid: st for sid, st in status.items() if st not in (WAITING, SUCCEEDED,
                                                                 "approved",
                                                                 "awaiting_approval")}
    out: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for s in steps:
            if status.get(s.step_id, WAITING) != WAITING or s.step_id in out:
                continue
            bad = [h for h in _holders(steps, waves, s) if h in ended]
            if bad:
                h = bad[0]
                how = ("dependency" if h in s.depends_on
                       else f"sync step of wave {waves[h]}")
                out[s.step_id] = f"{how} {h!r} did not succeed ({ended[h]})"
                ended[s.step_id] = "skipped"
                changed = True
    return out


def wave_count(steps: Sequence[PlanStep]) -> int:
    return max(wave_of(steps).values(), default=0)
