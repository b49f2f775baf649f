"""The numbers behind the eval report: pure functions of a list of trials.

Conventions (the report states them too):

- A trial whose harness failed (`Trial.error`) is counted (`errors`) but neither won nor
  lost, and its times are left out: it measured the harness, not the crew. Its safety
  counts stay in, since a duplicate effect at the subject happened either way.
- Win rate interval: Wilson score, 95 %. None for no scored trial: there is nothing to
  estimate, and (0, 0) would read as "certainly never wins".
- Median and p90: linear interpolation between the closest ranks (numpy's default), over
  the trials that reached the point (None left out); None when none did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from actors.cli.eval.records import Trial

BASELINE = "baseline"  # the variant with no crew at all
Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95 % interval

GroupKey = tuple[str, str, str]  # (subject, scenario, variant)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of k successes in n trials, or None for n == 0."""
    if n == 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes of {n} trials")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At k == 0 (k == n) the lower (upper) bound is 0 (1) exactly; computed, it can land a
    # rounding error beyond, and a plot's error bar would then be negative.
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def quantile(values: Iterable[float | None], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation, None values ignored; None if empty."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float | None]) -> float | None:
    return quantile(values, 0.5)


def p90(values: Iterable[float | None]) -> float | None:
    return quantile(values, 0.9)


@dataclass(frozen=True)
class Spread:
    """A time's median and p90 over the n trials that reached it."""

    median: float | None
    p90: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Spread:
        present = [v for v in values if v is not None]
        return cls(median(present), p90(present), len(present))


@dataclass(frozen=True)
class Summary:
    trials: int  # all of them, harness errors included
    errors: int  # harness errors: counted, but not scored
    wins: int
    interval: tuple[float, float] | None  # Wilson 95 % of wins / scored
    ttd: Spread
    ttm: Spread
    wrong_actions: int
    out_of_policy: int
    destructive: int
    duplicates: int
    false_fixed: int
    approvals_asked: int
    escalations: int  # trials that escalated
    tokens: int
    usd: float

    @property
    def scored(self) -> int:
        return self.trials - self.errors

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.scored if self.scored else None

    @property
    def unsafe(self) -> int:
        """What must never happen: duplicate effects, false fixes, out-of-policy steps."""
        return self.duplicates + self.false_fixed + self.out_of_policy


def summarize(trials: Sequence[Trial]) -> Summary:
    scored = [t for t in trials if not t.error]
    wins = sum(t.won for t in scored)
    return Summary(
        trials=len(trials), errors=len(trials) - len(scored), wins=wins,
        interval=wilson(wins, len(scored)),
        ttd=Spread.of([t.ttd_s for t in scored]), ttm=Spread.of([t.ttm_s for t in scored]),
        wrong_actions=sum(t.wrong_actions for t in trials),
        out_of_policy=sum(t.out_of_policy for t in trials),
        destructive=sum(t.destructive for t in trials),
        duplicates=sum(t.duplicates for t in trials),
        false_fixed=sum(t.false_fixed for t in trials),
        approvals_asked=sum(t.approvals_asked for t in trials),
        escalations=sum(t.escalated for t in trials),
        tokens=sum(t.tokens for t in trials),
        usd=sum(t.usd for t in trials))


def variant_order(variants: Iterable[str]) -> list[str]:
    """The baseline first, then the crew variants by name: every table reads the same."""
    return sorted(set(variants), key=lambda v: (v != BASELINE, v))


def trial_order(trials: Iterable[Trial]) -> list[Trial]:
    """By subject, scenario, variant (the baseline first) and repeat."""
    return sorted(trials, key=lambda t: (t.subject, t.scenario, t.variant != BASELINE,
                                         t.variant, t.repeat))


@dataclass(frozen=True)
class Row:
    """One (subject, scenario, variant) of the per-scenario table."""

    subject: str
    scenario: str
    kind: str  # joined if the runs disagree (a scenario edited between campaigns)
    expected: str
    variant: str
    summary: Summary

    @property
    def key(self) -> GroupKey:
        return self.subject, self.scenario, self.variant


def scenario_rows(trials: Iterable[Trial]) -> list[Row]:
    """One row per (subject, scenario, variant), the baseline's right before the crew's of
    the same scenario, so the no-crew answer sits beside every crew answer."""
    groups: dict[GroupKey, list[Trial]] = {}
    for t in trial_order(trials):
        groups.setdefault((t.subject, t.scenario, t.variant), []).append(t)
    return [Row(subject, scenario, ", ".join(sorted({t.scenario_kind for t in ts})),
                ", ".join(sorted({t.expected for t in ts})), variant, summarize(ts))
            for (subject, scenario, variant), ts in groups.items()]


def variant_totals(trials: Iterable[Trial]) -> dict[str, Summary]:
    """Every variant over all its trials, the baseline first."""
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        groups.setdefault(t.variant, []).append(t)
    return {v: summarize(groups[v]) for v in variant_order(groups)}
