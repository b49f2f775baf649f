"""What a runbook rule means: its condition syntax and the checks a rule set must pass.

One parser for every subject kind (built-in or declared in TOML), used by the
runbook diagnoser to match and by any loader to validate at start-up.
A condition is `<op><number>`, op one of >, <, >=, <=, ==, !=; NaN satisfies nothing.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bus_schemas.errors import MendersError
from subjects.base import RunbookRule

_OPS: tuple[tuple[str, Callable[[float, float], bool]], ...] = (
    (">=", operator.ge),
    ("<=", operator.le),
    ("==", lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)),
    ("!=", lambda a, b: not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)),
    (">", operator.gt),
    ("<", operator.lt),
)


class ConditionError(MendersError, ValueError):
    """A runbook condition string that is not `<op><number>`."""


@dataclass(frozen=True)
class Condition:
    op: str
    threshold: float
    test: Callable[[float, float], bool]

    def holds(self, value: float) -> bool:
        return not math.isnan(value) and self.test(value, self.threshold)


def parse_condition(cond: str) -> Condition:
    """Parse ">0.9", "<=10", "==0", ... ; raises ConditionError naming the bad text."""
    text = cond.strip()
    for op, test in _OPS:
        if text.startswith(op):
            try:
                threshold = float(text[len(op):].strip())
            except ValueError:
                break
            if math.isnan(threshold):
                break
            return Condition(op, threshold, test)
    raise ConditionError(f"bad condition {cond!r}: expected one of >, <, >=, <=, ==, != "
                         "followed by a number")


def match_condition(value: float, cond: str) -> bool:
    """Whether `value` satisfies `cond`; raises ConditionError for a malformed condition."""
    return parse_condition(cond).holds(float(value))


def check_rules(rules: Iterable[RunbookRule]) -> list[str]:
    """Problems in a subject's runbooks (bad conditions, confidence outside 0..1)."""
    problems = []
    for rule in rules:
        for metric, cond in rule.when.items():
            try:
                parse_condition(cond)
            except ConditionError as exc:
                problems.append(f"rule {rule.name}: {metric}: {exc}")
        if not 0.0 <= rule.confidence <= 1.0:
            problems.append(f"rule {rule.name}: confidence {rule.confidence} outside 0..1")
    return problems
