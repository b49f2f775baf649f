"""Prometheus text parsing and interval maths for the subjects' observers (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def parse(text: str) -> Samples:
    """Every sample as (name, sorted labels) -> value; `_created` samples dropped."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def total(samples: Mapping[tuple[str, Labels], float], name: str,
          where: Mapping[str, str] | None = None) -> float:
    """Sum of a metric's samples whose labels include `where`."""
    acc = 0.0
    for (n, labels), value in samples.items():
        if n == name and (not where or all(kv in labels for kv in where.items())):
            acc += value
    return acc


def delta(now: float, before: float | None) -> float:
    """A counter's increase; a reset (the service restarted) counts from zero."""
    if before is None:
        return 0.0
    return now - before if now >= before else now


def buckets(samples: Mapping[tuple[str, Labels], float], name: str) -> dict[float, float]:
    """Cumulative bucket counts of a histogram summed over its other labels: le -> count."""
    out: dict[float, float] = {}
    for (n, labels), value in samples.items():
        if n != f"{name}_bucket":
            continue
        le = dict(labels).get("le")
        if le is not None:
            bound = math.inf if le == "+Inf" else float(le)
            out[bound] = out.get(bound, 0.0) + value
    return out


def quantile(q: float, cumulative: Iterable[tuple[float, float]]) -> float:
    """histogram_quantile over cumulative (upper bound, count) pairs, in the bound's unit.

    Linear interpolation inside the bucket, like Prometheus; a quantile in the
    +Inf bucket answers the highest finite bound. No observations: 0.
    """
    pairs = sorted(cumulative)
    if not pairs or pairs[-1][1] <= 0:
        return 0.0
    rank = q * pairs[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in pairs:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def bucket_deltas(now: Mapping[float, float], before: Mapping[float, float] | None,
                  ) -> list[tuple[float, float]]:
    """The interval's cumulative bucket counts; a reset counts from zero."""
    if before is None:
        return []
    if any(now.get(le, 0.0) < count for le, count in before.items()):
        return sorted(now.items())
    return sorted((le, count - before.get(le, 0.0)) for le, count in now.items())
