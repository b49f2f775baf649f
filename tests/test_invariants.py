"""Unit tests of the pure invariant evaluation (subjects.invariants)."""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from subjects import invariants as inv
from subjects.base import InvariantSpec

P99 = InvariantSpec(name="latency_p99", metric="p99_ms", description="p99 < 250 ms",
                    threshold=250.0, clear=200.0, for_s=2.0)
ERRORS = InvariantSpec(name="error_rate", metric="error_rate", description="errors < 5%",
                       threshold=0.05, for_s=2.0, down_breaks=True)
GROWTH = InvariantSpec(name="disk_growth", metric="log_dir_mb", description="slow growth",
                       kind="rate", threshold=1.0, for_s=2.0, window_s=4.0)
MEMORY = InvariantSpec(name="memory", metric="memory_mb", description="memory near baseline",
                       kind="baseline", threshold=100.0, clear=80.0, factor=2.0, for_s=2.0)


def run(spec: InvariantSpec, values: Iterable[float | None], *, start: float = 1000.0,
        dt: float = 1.0, fresh: bool = True, state: inv.InvState | None = None,
        down: Iterable[bool] | None = None) -> tuple[inv.InvState, list[tuple[float, str]]]:
    """Feed samples one `dt` apart; return the final state and (ts, transition) pairs."""
    s = state or inv.InvState()
    out: list[tuple[float, str]] = []
    downs = list(down) if down is not None else None
    for i, v in enumerate(values):
        ts = start + i * dt
        d = downs[i] if downs is not None else False
        res = inv.step(spec, s, inv.Sample(ts, v, d), fresh=fresh, new_incident_id=f"inc-{i}")
        s = res.state
        if res.transition:
            out.append((ts, res.transition))
    return s, out


# --- threshold, for-duration, hysteresis -------------------------------------------------


def test_sustained_breach_opens_once_after_for_s() -> None:
    state, out = run(P99, [100, 300, 300, 300, 300, 300, 300])
    assert out == [(1003.0, "open")]  # bad since 1001, open at 1001 + for_s
    assert state.open is not None and state.open.incident_id == "inc-3"


def test_scrape_jitter_does_not_cost_an_extra_sample() -> None:
    _, out = run(P99, [300, 300, 300], dt=0.999)
    assert [t for _, t in out] == ["open"]
    _, out = run(P99, [300, 300, 300], dt=0.9)  # 1.8 s is not 2 s
    assert out == []


def test_breach_shorter_than_for_s_opens_nothing() -> None:
    _, out = run(P99, [100, 300, 300, 100, 300, 300, 100, 300])
    assert out == []


def test_values_between_clear_and_threshold_neither_open_nor_resolve() -> None:
    # Before an incident the band counts as healthy: the breach timer restarts.
    _, out = run(P99, [300, 240, 300, 240, 300, 240, 300])
    assert out == []
    # After opening, the band is not healthy enough to resolve: no flapping.
    state, out = run(P99, [300, 300, 300, *[240, 260, 210, 255] * 5])
    assert [t for _, t in out if t != "update"] == ["open"]
    assert state.open is not None


def test_resolves_after_clear_for_for_s() -> None:
    state, out = run(P99, [300, 300, 300, 150, 150, 150])
    assert [t for _, t in out] == ["open", "resolve"]
    assert out[1][0] == 1005.0  # clear since 1003, + for_s
    assert state.open is None and state.breach_since is None


def test_update_only_when_value_moves_and_not_too_often() -> None:
    values = [300.0] * 3 + [310.0] * 10 + [600.0] * 10
    _, out = run(P99, values)
    kinds = [(ts - 1000, t) for ts, t in out]
    # 310 vs 300 is not a meaningful move; 600 is, once UPDATE_EVERY_S has passed.
    assert kinds == [(2.0, "open"), (13.0, "update")]


def test_down_breaks_only_where_configured() -> None:
    _, out = run(ERRORS, [None, None, None], down=[True] * 3)
    assert [t for _, t in out] == ["open"]
    state, out = run(P99, [None] * 5, down=[True] * 5)
    assert out == [] and state.breach_since is None


def test_missing_metric_does_not_reset_timers() -> None:
    _, out = run(P99, [300, None, 300, 300])
    assert [(ts - 1000, t) for ts, t in out] == [(2.0, "open")]


def test_stale_samples_move_timers_but_never_transition() -> None:
    state, out = run(P99, [300] * 10, fresh=False)
    assert out == [] and state.breach_since == 1000.0
    # The first fresh sample sees a breach the backlog shows has lasted for_s.
    _, out = run(P99, [300], start=1010.0, state=state)
    assert out == [(1010.0, "open")]


def test_out_of_order_sample_is_ignored() -> None:
    state, _ = run(P99, [300, 300])
    res = inv.step(P99, state, inv.Sample(1000.5, 300.0), fresh=True, new_incident_id="x")
    assert res.state == state and res.transition is None


def test_a_long_gap_restarts_the_breach_timer() -> None:
    state, out = run(P99, [300])
    _, out = run(P99, [300], start=1000.0 + inv.MAX_GAP_S + 5, state=state)
    assert out == []


# --- rate and baseline --------------------------------------------------------------------


def test_a_rate_invariant_breaks_on_fast_growth_over_its_window_only() -> None:
    learner = inv.Learner()
    a = None
    for i in range(6):
        learner, a = inv.assess(GROWTH, learner, inv.Sample(1000.0 + i, 10.0 + 3 * i))
    assert a is not None and a.value is not None and abs(a.value - 3.0) < 1e-9
    assert a.breaking and len(learner.window) <= 5  # only window_s of history kept
    _, out = run(GROWTH, [10 + 3 * i for i in range(10)])
    assert [t for _, t in out] == ["open"]
    _, out = run(GROWTH, [10 + 0.5 * i for i in range(10)])
    assert out == []


def test_baseline_learns_and_breaks_above_factor() -> None:
    state, out = run(MEMORY, [60.0] * 20)
    assert out == [] and state.learner.baseline is not None
    assert abs(state.learner.baseline - 60.0) < 1e-9
    limit, clear = inv.limits(MEMORY, state.learner)
    assert limit == 120.0 and clear == 96.0  # factor x baseline, same hysteresis ratio
    state, out = run(MEMORY, [130.0] * 4, start=1020.0, state=state)
    assert [t for _, t in out] == ["open"]
    # Breaching samples are not learned: the baseline does not chase the leak.
    assert state.learner.baseline is not None and abs(state.learner.baseline - 60.0) < 1e-9


def test_baseline_threshold_is_a_floor() -> None:
    state, out = run(MEMORY, [10.0] * 20)
    assert inv.limits(MEMORY, state.learner)[0] == 100.0
    _, out = run(MEMORY, [90.0] * 5, start=1020.0, state=state)
    assert out == []


# --- properties -----------------------------------------------------------------------------

values = st.lists(st.one_of(st.none(), st.floats(0, 600)), min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(values)
def test_transitions_alternate_open_then_resolve(vals: list[float | None]) -> None:
    _, out = run(P99, vals)
    open_ = False
    for _, t in out:
        if t == "open":
            assert not open_
            open_ = True
        elif t == "resolve":
            assert open_
            open_ = False
        else:
            assert open_ and t == "update"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 600), min_size=1, max_size=80))
def test_no_open_when_every_breach_is_shorter_than_for_s(vals: list[float]) -> None:
    longest = run_len = 0
    for v in vals:
        run_len = run_len + 1 if v >= P99.threshold else 0
        longest = max(longest, run_len)
    _, out = run(P99, vals)
    # Samples are 1 s apart: a run of n breaking samples lasts n - 1 seconds.
    opened = any(t == "open" for _, t in out)
    assert opened == (longest - 1 >= P99.for_s)


@settings(max_examples=200, deadline=None)
@given(values)
def test_stale_samples_never_transition(vals: list[float | None]) -> None:
    _, out = run(P99, vals, fresh=False)
    assert out == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(1, 1000), min_size=1, max_size=50))
def test_baseline_stays_within_learned_values(vals: list[float]) -> None:
    learner = inv.Learner()
    for v in vals:
        learner = inv.learn(MEMORY, learner, inv.Sample(0.0, v))
    assert learner.baseline is not None and learner.samples == len(vals)
    assert min(vals) - 1e-6 <= learner.baseline <= max(vals) + 1e-6
