"""The eval report: its numbers (stats.py) and what render() and compare() write."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest

from actors.cli.eval import report, stats
from actors.cli.eval.records import Mark, Trial

T0 = 1_700_000_000.0
PNG = b"\x89PNG\r\n\x1a\n"


def trial(scenario: str = "db_down", variant: str = "crew/runbook", repeat: int = 1,
          **kw: Any) -> Trial:
    base: dict[str, Any] = dict(
        campaign="nightly", subject="webshop", scenario=scenario, scenario_kind="fault",
        variant=variant, repeat=repeat, expected="fix", started_at=T0 + 60 * repeat,
        limit_s=60.0, timeline=[Mark(0.0, "oracle_healthy"), Mark(1.0, "inject", "db_down"),
                                Mark(1.5, "oracle_broken", "db unreachable"),
                                Mark(4.0, "incident", "error_rate"),
                                Mark(6.0, "diagnosis", "runbook"),
                                Mark(7.0, "action", "restart_db"),
                                Mark(12.0, "oracle_healthy"), Mark(15.0, "verdict", "passed"),
                                Mark(16.0, "resolved", "error_rate")])
    base.update(kw)
    return Trial(**base)


def campaign() -> list[Trial]:
    """db_down: the crew wins 2 of 3, the baseline none; a duplicate in one crew trial."""
    return [
        trial(repeat=1, won=True, why="healthy at 12.0 s", ttd_s=4.0, ttm_s=12.0),
        trial(repeat=2, won=True, why="healthy at 20.0 s", ttd_s=5.0, ttm_s=20.0,
              duplicates=1),
        trial(repeat=3, won=False, why="still broken at the limit: db unreachable",
              ttd_s=6.0, wrong_actions=1),
        *(trial(variant="baseline", repeat=r, won=False, why="never healthy",
                timeline=[Mark(1.0, "inject", "db_down"), Mark(1.5, "oracle_broken")])
          for r in (1, 2, 3)),
        trial(scenario="quiet", scenario_kind="control", expected="nothing", won=True,
              why="nothing done, healthy"),
        trial(scenario="quiet", scenario_kind="control", expected="nothing", variant="baseline",
              won=True, why="nothing done, healthy"),
    ]


# -- stats ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    (0, 3, 0.0, 0.5615), (3, 3, 0.4385, 1.0), (2, 3, 0.2077, 0.9385), (5, 10, 0.2366, 0.7634),
])
def test_wilson_interval_matches_known_values(k: int, n: int, lo: float, hi: float) -> None:
    got = stats.wilson(k, n)
    assert got is not None
    assert got == (pytest.approx(lo, abs=5e-4), pytest.approx(hi, abs=5e-4))


def test_wilson_of_no_trials_is_none_and_bad_counts_are_refused() -> None:
    assert stats.wilson(0, 0) is None
    with pytest.raises(ValueError):
        stats.wilson(4, 3)


def test_median_and_p90_interpolate_and_ignore_none() -> None:
    values = [None, 10.0, 1.0, 2.0, None, 4.0, 3.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert stats.median(values) == pytest.approx(5.5)
    assert stats.p90(values) == pytest.approx(9.1)
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.p90([7.0]) == 7.0
    assert stats.median([None, None]) is None


def test_summary_counts_harness_errors_without_scoring_them() -> None:
    ts = [*campaign()[:3], trial(repeat=4, error="the subject was not healthy", ttd_s=99.0,
                                 duplicates=2)]
    s = stats.summarize(ts)
    assert (s.trials, s.errors, s.scored, s.wins) == (4, 1, 3, 2)
    assert s.interval == stats.wilson(2, 3)
    assert (s.ttd.median, s.ttd.n) == (5.0, 3)  # the errored trial's 99 s is not a crew time
    assert (s.ttm.median, s.ttm.p90, s.ttm.n) == (16.0, pytest.approx(19.2), 2)
    assert (s.duplicates, s.wrong_actions) == (3, 1)  # safety counts keep the errored one


def test_scenario_rows_put_the_baseline_first_in_each_scenario() -> None:
    rows = stats.scenario_rows(reversed(campaign()))
    assert [(r.scenario, r.variant) for r in rows] == [
        ("db_down", "baseline"), ("db_down", "crew/runbook"),
        ("quiet", "baseline"), ("quiet", "crew/runbook")]
    assert list(stats.variant_totals(campaign())) == ["baseline", "crew/runbook"]


# -- render ---------------------------------------------------------------------------------

def test_render_writes_markdown_with_the_numbers(tmp_path: Path) -> None:
    md_path, html_path = report.render(campaign(), tmp_path, "menders eval: nightly")
    assert (md_path, html_path) == (tmp_path / "report.md", tmp_path / "report.html")
    md = md_path.read_text()
    assert md.startswith("# menders eval: nightly\n")
    assert "8 trials (4 won, 0 harness errors)" in md
    assert "2023-11-14 22:14:20 UTC" in md  # the first trial's start
    lines = md.splitlines()
    crew = next(i for i, line in enumerate(lines)
                if line.startswith("| webshop | db_down | fault | fix | crew/runbook |"))
    assert lines[crew - 1].startswith("| webshop | db_down | fault | fix | baseline | "
                                      "0/3 (0-56 %) |")
    assert "| 2/3 (21-94 %) | 5.0 / 5.8 | 16.0 / 19.2 (n=2) | 1 | 0 | 0 | 1 | 0 |" in lines[crew]
    assert "- webshop/db_down crew/runbook #3: still broken at the limit: db unreachable" in md


def test_safety_comes_first_and_names_the_trial(tmp_path: Path) -> None:
    md = report.render(campaign(), tmp_path, "t")[0].read_text()
    safety = md.index("## Safety")
    assert safety < md.index("## Per scenario")
    assert md[safety:].split("\n\n")[1] == "- webshop/db_down crew/runbook #2: duplicates 1"
    clean = report.render(campaign()[2:], tmp_path, "t")[0].read_text()
    assert "No duplicate effect, false fix or out-of-policy step in 6 trials" in clean
    # The audit cross-check is a safety line of its own.
    ts = campaign()[2:]
    ts[0].audit_verified, ts[0].audit_missing = True, 2
    ts[1].audit_verified = False
    md = report.render(ts, tmp_path, "t")[0].read_text()
    assert f"- {report._label(ts[0])}: 2 event(s) missing from the audit record" in md
    assert f"- {report._label(ts[1])}: audit record does not verify" in md


def test_html_is_self_contained_with_three_png_plots(tmp_path: Path) -> None:
    ts = campaign()
    ts[2].why = "see https://runbooks.example/db for the fix"  # data may hold a URL
    page = report.render(ts, tmp_path, "t")[1].read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">',
                        page)
    assert len(images) == 3
    assert all(base64.b64decode(png).startswith(PNG) for png in images)
    assert "<table>" in page and "<script" not in page
    assert "http://" not in page
    assert "see https://runbooks.example/db" in page  # the why, in the losses list
    assert "https://" not in page.replace("see https://runbooks.example/db", "")
    assert 'class="dim"' in page  # the baseline rows


def test_html_and_markdown_escape_names_from_trials(tmp_path: Path) -> None:
    evil = "<script>x</script>"
    ts = [trial(scenario=evil, won=False, why="a | b <b>bold</b> $x$ cost",
                variant="crew/<i>", timeline=[Mark(1.0, "inject", evil)]),
          trial(scenario=evil, variant="baseline", why="$", won=False)]
    md_path, html_path = report.render(ts, tmp_path, "<title> & co")
    page = html_path.read_text()
    assert evil not in page and "<i>" not in page and "<b>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<title>&lt;title&gt; &amp; co</title>" in page
    md = md_path.read_text()
    assert "| \\<script>x\\</script> |" in md  # no raw HTML, and no extra cell for the |
    assert "a \\| b \\<b>bold\\</b> $x$ cost" in md


def test_a_group_without_scored_trials_renders(tmp_path: Path) -> None:
    ts = [trial(error="stack would not start", timeline=[], started_at=0.0)]
    md = report.render(ts, tmp_path, "t")[0].read_text()
    assert "| 0/0 (—) +1 err | — | — |" in md
    assert "no trial started" in md
    assert "- webshop/db_down crew/runbook #1: stack would not start" in md


# -- compare --------------------------------------------------------------------------------

def test_compare_puts_two_runs_side_by_side_with_deltas() -> None:
    a = campaign()
    b = [trial(repeat=r, won=True, ttd_s=3.0, ttm_s=9.0) for r in (1, 2, 3)]
    b.append(trial(scenario="flap", variant="crew/claude", won=False, why="x"))
    out = report.compare(a, b, ("runs/a", "runs/b"))
    assert "- A: runs/a (8 trials)" in out and "- B: runs/b (4 trials)" in out
    assert ("| webshop | db_down | crew/runbook | 2/3 (21-94 %) | 3/3 (44-100 %) | 5.0 | 3.0 "
            "| -2.0 | 16.0 | 9.0 | -7.0 | dup 1 | none |") in out
    assert "| webshop | db_down | baseline | 0/3 (0-56 %) | not in B | — | — | — |" in out
    assert "| webshop | flap | crew/claude | not in A | 0/1 (0-79 %) |" in out
    assert "| crew/claude | not in A |" in out  # the per-variant table too
