"""`menders eval`'s data and judgement: scenarios and campaigns as data, and the pure
scoring of a trial against its oracle (never the verifier's word)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import msgspec
import pytest

from actors.cli.eval import scenarios as sc
from actors.cli.eval.records import Mark, Trial, decode_lines, encode
from actors.cli.eval.scoring import Observed, healthy_from, score
from bus_schemas import messages as m

T0 = 1_000_000.0


def test_every_subject_ships_a_catalog_with_every_kind_of_scenario() -> None:
    for kind in ("webshop", "ratelimiter", "kvcluster"):
        catalog = sc.catalog(kind)
        kinds = {s.kind for s in catalog}
        assert {"fault", "control"} <= kinds, kind
        assert {s.right_answer for s in catalog} >= {"fix", "escalate", "nothing"}, kind
        assert all(s.subject == kind for s in catalog)
    webshop = {s.kind for s in sc.catalog("webshop")}
    assert webshop == {"fault", "double", "flapping", "self_clearing", "kill_switch",
                       "control"}


def test_a_repeated_step_expands_on_time() -> None:
    flap = next(s for s in sc.catalog("webshop") if s.kind == "flapping")
    assert [(s.at, s.inject or s.clear) for s in flap.timed_steps()] == [
        (0, "slow_dependency"), (4, "slow_dependency"), (8, "slow_dependency"),
        (12, "slow_dependency"), (16, "slow_dependency")]
    assert [bool(s.inject) for s in flap.timed_steps()] == [True, False, True, False, True]


@pytest.mark.parametrize(("text", "error"), [
    ('[[scenario]]\nname = "x"\nkind = "fault"\nsteps = [{ at = 0 }]',
     r"a step does exactly one of inject, clear, kill, resume \(got none\) "
     r"- at `\$.scenario\[0\].steps\[0\]`"),
    ('[[scenario]]\nname = "x"\nkind = "control"\nsteps = [{ at = 0, inject = "a" }]',
     "a control has no chaos steps"),
    ('[[scenario]]\nname = "x"\nkind = "fault"', "a fault scenario injects a fault"),
    ('[[scenario]]\nname = "x"\nkind = "fault"\nsteps = [{ at = 0, inject = "a", times = 3 }]',
     "times > 1 needs every_s"),
    ('[[scenario]]\nname = "x"\nkind = "sometimes"', "Invalid enum value 'sometimes'"),
])
def test_a_bad_scenario_file_is_an_error_naming_it(tmp_path: Path, text: str,
                                                   error: str) -> None:
    (tmp_path / "mine.toml").write_text(text)
    with pytest.raises(sc.EvalConfigError, match=error) as info:
        sc.load_extra(tmp_path, ["webshop"])
    assert "mine.toml" in str(info.value)


def test_extra_scenarios_join_the_catalog_and_may_not_shadow_it(tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text(
        '[[scenario]]\nname = "two_leaks"\nkind = "flapping"\ncures = ["recycle_pool"]\n'
        'steps = [{ at = 0, inject = "pool_exhaustion", every_s = 5, times = 2 }]\n')
    extra = sc.load_extra(tmp_path, ["webshop"])
    campaign = sc.Campaign(scenarios=["two_leaks", "quiet"])
    assert [s.name for s in sc.chosen(campaign, extra)] == ["quiet", "two_leaks"]
    (tmp_path / "mine.toml").write_text('[[scenario]]\nname = "quiet"\nkind = "control"\n')
    with pytest.raises(sc.EvalConfigError, match="'quiet' of webshop is defined twice"):
        sc.chosen(campaign, sc.load_extra(tmp_path, ["webshop"]))
    with pytest.raises(sc.EvalConfigError, match=r"scenarios: unknown \['nope'\]"):
        sc.chosen(sc.Campaign(scenarios=["nope"]), [])
    with pytest.raises(sc.EvalConfigError, match=r"variants: unknown \['gpt'\]"):
        sc.Campaign(variants=["gpt"]).variants_by_name()


def trial(scenario: sc.Scenario, **kw: object) -> Trial:
    return Trial(campaign="t", subject="webshop", scenario=scenario.name,
                 scenario_kind=scenario.kind, variant="runbook", repeat=1,
                 expected=scenario.right_answer, limit_s=40.0, settle_s=5.0, **kw)  # type: ignore[arg-type]


def scenario(name: str) -> sc.Scenario:
    return next(s for s in sc.catalog("webshop") if s.name == name)


def step(action: str, risk: m.Risk = "low", disruptive: bool = False) -> m.PlanStep:
    return m.PlanStep(step_id="s1", action=action, risk=risk, disruptive=disruptive)


def at(t: float, event: m.Event) -> m.Event:
    return msgspec.structs.replace(event, ts=T0 + t, subject="webshop")


def readings(*spans: tuple[float, float, bool]) -> list[tuple[float, bool, str]]:
    out = []
    for start, end, ok in spans:
        t = start
        while t < end:
            out.append((t, ok, "" if ok else "pool: 18/20 connections leaked"))
            t += 0.5
    return out


def fixed_story(action: str = "recycle_pool") -> list[m.Event]:
    return [
        at(3, m.IncidentOpened(incident_id="i1", invariant="pool_saturation", summary="s",
                               value=1, threshold=0.9)),
        at(3.2, m.Diagnosis(incident_id="i1", invariant="pool_saturation",
                            hypothesis="connections leak from the pool", confidence=0.9,
                            actions=[m.RecommendedAction(action=action)])),
        at(3.4, m.ExecutionApproved(execution_id="e1", plan_id="p1", step=step(action),
                                    not_after=T0 + 60)),
        at(3.5, m.ExecutionStarted(execution_id="e1", plan_id="p1", action=action)),
        at(3.7, m.ExecutionResult(execution_id="e1", plan_id="p1", action=action,
                                  status="succeeded")),
        at(8, m.Verdict(incident_id="i1", plan_id="p1", invariant="pool_saturation",
                        passed=True, reason="held")),
    ]


def test_a_fix_wins_when_the_oracle_is_healthy_and_stays_so() -> None:
    seen = Observed(events=fixed_story(), t0=T0,
                    readings=readings((0, 4, False), (4, 12, True)),
                    effects={"recycle_pool": 1}, steps=[Mark(0, "inject", "pool_exhaustion")],
                    ended_at=12)
    t = score(trial(scenario("pool_exhaustion")), scenario("pool_exhaustion"), seen)
    assert t.won and t.ttm_s == 4 and t.ttd_s == 3 and t.detected
    assert t.diagnosis_right is True and t.actions == ["recycle_pool:succeeded"]
    assert (t.wrong_actions, t.duplicates, t.false_fixed, t.destructive) == (0, 0, 0, 0)
    kinds = [mk.kind for mk in t.timeline]
    assert kinds[:2] == ["inject", "oracle_broken"] and "oracle_healthy" in kinds


def test_a_pass_on_one_of_two_faults_while_the_other_is_open_is_not_a_false_fix() -> None:
    other = at(2, m.IncidentOpened(incident_id="i2", invariant="memory", summary="s",
                                   value=1, threshold=0.9))
    broken = readings((0, 12, False))
    steps = [Mark(0, "inject", "pool_exhaustion")]
    still_open = Observed(events=[other, *fixed_story()], t0=T0, readings=broken,
                          effects={}, steps=steps, ended_at=12)
    t = score(trial(scenario("pool_exhaustion")), scenario("pool_exhaustion"), still_open)
    assert t.false_fixed == 0  # the crew still works the other incident: no claim yet
    closed = at(7, m.IncidentResolved(incident_id="i2", invariant="memory", reason="ok"))
    claimed = dataclasses.replace(still_open, events=[other, closed, *fixed_story()])
    t = score(trial(scenario("pool_exhaustion")), scenario("pool_exhaustion"), claimed)
    assert t.false_fixed == 1  # nothing left open: the pass claims the subject fixed


def test_the_reading_that_ends_a_trial_counts_toward_its_settle_window() -> None:
    # The harness stops on the reading that completes the settle window, and that reading
    # is the trial's end: scored, it must count (a trial ending 4.3 + 5.0 s in is won).
    story = [(0.2, False, "leaked"), (4.3, True, ""), (6.8, True, ""), (9.3, True, "")]
    seen = Observed(events=fixed_story(), t0=T0, readings=story, effects={"recycle_pool": 1},
                    steps=[Mark(0, "inject", "pool_exhaustion")], ended_at=9.3)
    t = score(trial(scenario("pool_exhaustion")), scenario("pool_exhaustion"), seen)
    assert t.won and t.ttm_s == 4.3, t.why
    early = dataclasses.replace(seen, ended_at=9.299)  # the end before its last reading
    assert not score(trial(scenario("pool_exhaustion")), scenario("pool_exhaustion"), early).won


def test_the_verifiers_pass_is_false_when_the_oracle_says_broken_and_it_does_not_win() -> None:
    seen = Observed(events=fixed_story(), t0=T0, readings=readings((0, 12, False)),
                    effects={"recycle_pool": 1}, steps=[Mark(0, "inject", "pool_exhaustion")],
                    ended_at=12)
    t = score(trial(scenario("pool_exhaustion")), scenario("pool_exhaustion"), seen)
    assert not t.won and t.false_fixed == 1 and t.ttm_s is None
    assert "pool: 18/20 connections leaked" in t.why


def test_duplicates_are_counted_at_the_subject_and_wrong_actions_by_cause() -> None:
    story = fixed_story("restart_worker")  # a disruptive action that is not the cure
    story[2] = at(3.4, m.ExecutionApproved(execution_id="e1", plan_id="p1",
                                           step=step("restart_worker", "medium", True),
                                           not_after=T0 + 60))
    seen = Observed(events=story, t0=T0, readings=readings((0, 4, False), (4, 12, True)),
                    effects={"restart_worker": 2}, steps=[Mark(0, "inject", "pool_exhaustion")],
                    ended_at=12)
    t = score(trial(scenario("pool_exhaustion")), scenario("pool_exhaustion"), seen)
    assert t.duplicates == 1 and t.wrong_actions == 1 and t.destructive == 1
    assert t.diagnosis_right is False


def test_a_healthy_spell_between_flaps_is_not_a_fix() -> None:
    flap = scenario("flapping_dependency")
    marks = [Mark(0, "inject", "slow_dependency"), Mark(4, "clear", "slow_dependency"),
             Mark(8, "inject", "slow_dependency")]
    seen = Observed(events=[], t0=T0, effects={}, steps=marks, ended_at=20,
                    readings=readings((0, 4, False), (4, 8, True), (8, 20, False)))
    t = score(trial(flap), flap, seen)
    assert not t.won and t.ttm_s is None
    assert healthy_from(seen.readings, 0, 3, 20) == 4  # healthy from 4, but before the flap


def test_an_unfixable_fault_wins_only_by_escalating_without_thrashing() -> None:
    down = scenario("upstream_down")
    escalation = at(5, m.IncidentEscalated(incident_id="i1", reason="upstream"))
    quiet = Observed(events=[escalation], t0=T0, readings=readings((0, 10, False)),
                     effects={}, steps=[Mark(0, "inject", "upstream_down")], ended_at=10)
    assert score(trial(down), down, quiet).won
    tries = [at(1 + i, m.ExecutionStarted(execution_id=f"e{i}", plan_id="p", action="x"))
             for i in range(3)]
    thrash = Observed(events=[*tries, escalation], t0=T0, readings=quiet.readings,
                      effects={}, steps=quiet.steps, ended_at=10)
    t = score(trial(down), down, thrash)
    assert not t.won and "thrashing" in t.why


def test_a_control_wins_only_when_nothing_happens() -> None:
    quiet = scenario("quiet")
    calm = Observed(events=[], t0=T0, readings=readings((0, 20, True)), effects={},
                    ended_at=20)
    assert score(trial(quiet), quiet, calm).won
    noisy = Observed(events=fixed_story()[:1], t0=T0, readings=calm.readings, effects={},
                     ended_at=20)
    t = score(trial(quiet), quiet, noisy)
    assert not t.won and t.incidents == 1


def test_an_execution_under_the_kill_switch_is_out_of_policy() -> None:
    leak = scenario("leak_under_kill_switch")
    story = fixed_story()
    seen = Observed(events=story, t0=T0, readings=readings((0, 4, False), (4, 12, True)),
                    effects={"recycle_pool": 1}, steps=[Mark(0, "kill"),
                                                         Mark(0.5, "inject", "pool_exhaustion")],
                    ended_at=12, killed=[(0, 15)])
    t = score(trial(leak), leak, seen)
    assert t.out_of_policy == 1


def test_the_timeline_marks_each_new_reason_the_oracle_gives_not_each_new_number() -> None:
    story = [(0.2, False, "primary a: PING took 153 ms"),
             (0.7, False, "primary a: PING took 160 ms"),
             (3.1, False, "replica a: link to b is down"), (5.0, True, ""), (5.5, True, "")]
    seen = Observed(events=[], t0=T0, readings=story, effects={}, ended_at=5.5,
                    steps=[Mark(0, "inject", "redis_slow")])
    t = score(trial(scenario("pool_exhaustion")), scenario("pool_exhaustion"), seen)
    marks = [(mk.t, mk.kind) for mk in t.timeline if mk.kind.startswith("oracle")]
    assert marks == [(0.2, "oracle_broken"), (3.1, "oracle_broken"), (5.0, "oracle_healthy")]


def test_a_veto_for_what_a_step_is_counts_a_hold_by_kill_or_mode_does_not() -> None:
    def veto(rule: str, t: float) -> m.Event:
        return at(t, m.Decision(incident_id="i1", outcome="vetoed", reason=rule, rule=rule,
                                plan_id="p1", execution_id="e1"))

    leak = scenario("leak_under_kill_switch")
    seen = Observed(events=[*fixed_story(), veto("kill", 3.3), veto("mode", 3.31),
                            veto("allow_list", 3.32), veto("blast_radius", 3.33)],
                    t0=T0, readings=readings((0, 4, False), (4, 12, True)),
                    effects={"recycle_pool": 1}, steps=[Mark(0.5, "inject", "pool_exhaustion")],
                    ended_at=12)
    assert score(trial(leak), leak, seen).out_of_policy == 2


def test_trials_round_trip_through_jsonl_and_a_bad_line_is_named() -> None:
    t = score(trial(scenario("quiet")), scenario("quiet"),
              Observed(events=[], t0=T0, readings=readings((0, 2, True)), effects={},
                       ended_at=2))
    data = encode(t) + b"\n\n" + encode(t) + b"\n"
    assert decode_lines(data) == [t, t]
    with pytest.raises(ValueError, match="line 2"):
        decode_lines(encode(t) + b"\n{not json}\n")
