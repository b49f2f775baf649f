"""The wave rules of a plan (actors/governor/waves.py), pure: no bus."""

from __future__ import annotations

from actors.governor import waves
from bus_schemas.messages import PlanStep, StepMode


def s(sid: str, *deps: str, mode: StepMode = "sync", disruptive: bool = False) -> PlanStep:
    return PlanStep(step_id=sid, action=f"do_{sid}", depends_on=list(deps), mode=mode,
                    disruptive=disruptive)


# compact -> defrag a (async), defrag b (sync) -> disarm; a note beside wave 1.
PLAN = [s("compact"), s("note", mode="fire_and_forget"), s("a", "compact", mode="async"),
        s("b", "compact"), s("disarm", "b"), s("after_a", "a")]


def ids(steps: list[PlanStep]) -> list[str]:
    return [x.step_id for x in steps]


def test_a_steps_wave_is_one_more_than_its_deepest_dependency() -> None:
    assert waves.wave_of(PLAN) == {"compact": 1, "note": 1, "a": 2, "b": 2, "disarm": 3,
                                   "after_a": 3}
    assert waves.wave_count(PLAN) == 3
    assert waves.wave_of([s("x", "y"), s("y", "x"), s("z", "nope")]) == {"x": 0, "y": 0,
                                                                         "z": 0}


def test_a_sync_step_holds_every_later_wave_and_an_async_one_only_its_dependents() -> None:
    assert ids(waves.startable(PLAN, {})) == ["compact", "note"]
    st = {"compact": "succeeded", "note": "approved"}
    assert ids(waves.startable(PLAN, st)) == ["a", "b"]
    # b (sync, wave 2) still runs: wave 3 waits, even after_a whose only dependency is a.
    st |= {"a": "succeeded", "b": "approved"}
    assert ids(waves.startable(PLAN, st)) == []
    # b succeeded, a (async) still runs: disarm starts, after_a waits for a alone.
    st |= {"a": "approved", "b": "succeeded"}
    assert ids(waves.startable(PLAN, st)) == ["disarm"]


def test_a_failed_sync_step_dooms_every_later_wave_and_an_async_one_its_dependents() -> None:
    st = {"compact": "succeeded", "note": "failed", "a": "failed", "b": "approved"}
    assert waves.doomed(PLAN, st) == {"after_a": "dependency 'a' did not succeed (failed)"}
    st = {"compact": "succeeded", "note": "succeeded", "a": "approved", "b": "failed"}
    assert waves.doomed(PLAN, st) == {
        "disarm": "dependency 'b' did not succeed (failed)",
        "after_a": "sync step of wave 2 'b' did not succeed (failed)"}
    # A vetoed first wave: everything behind it is doomed, transitively.
    st = {"compact": "vetoed", "note": "succeeded"}
    assert set(waves.doomed(PLAN, st)) == {"a", "b", "disarm", "after_a"}
    # A failed fire-and-forget step dooms nothing.
    assert waves.doomed(PLAN, {"note": "failed"}) == {}


def test_fire_and_forget_may_not_be_depended_on_nor_be_disruptive() -> None:
    plan = [s("snap", mode="fire_and_forget"), s("use", "snap"),
            s("restart", mode="fire_and_forget")]
    got = waves.structure_problems(plan, {"restart": True})
    assert got == {
        "use": ("fire_and_forget", "step 'use' depends on fire-and-forget step 'snap', "
                "which holds nothing"),
        "restart": ("fire_and_forget", "step 'restart' (do_restart) takes a member out of "
                    "service: it may not be fire-and-forget")}
    assert waves.structure_problems(PLAN, {}) == {}
