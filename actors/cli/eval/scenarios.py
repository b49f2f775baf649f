"""Scenarios and campaigns: data, never code.

A scenario is a list of chaos steps against a subject's chaos hooks, with timings:

    [[scenario]]
    name = "pool_exhaustion"
    kind = "fault"                 # fault | double | flapping | self_clearing |
                                   # kill_switch | control
    cause = "connections leaked from the pool"
    cause_words = ["leak"]         # a diagnosis naming any of them names the cause
    cures = ["recycle_pool"]       # the actions that cure it; any other that ran is wrong
    steps = [{ at = 0, inject = "pool_exhaustion" }]

A step does one thing at `at` seconds: `inject` or `clear` a fault, `kill` (the kill
switch) or `resume`; `every_s` and `times` repeat it (a flapping fault). Every fault
still injected when the trial ends is cleared by the harness (its reset). The right
answer follows from the kind unless `expected` says otherwise: a control (no steps:
load only) and a fault that clears by itself want nothing done, a fault whose `cures`
is empty wants an escalation, every other one a fix.

Each subject kind ships its catalog as `subjects/<kind>/scenarios.toml`;
`menders eval --scenarios DIR` adds every `*.toml` in DIR (a name already known is an
error, not a silent override). A campaign (TOML) names subjects, scenarios, variants,
repeats and time limits; `SMOKE` is the one CI runs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from actors.cli.eval.records import Expected, ScenarioKind
from bus_schemas.errors import MendersError

Seconds = Annotated[float, msgspec.Meta(ge=0, le=3600)]


class EvalConfigError(MendersError, ValueError):
    pass


class Step(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    at: Seconds
    inject: str = ""
    clear: str = ""
    kill: bool = False
    resume: bool = False
    every_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    times: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1

    def __post_init__(self) -> None:
        did = [w for w in ("inject", "clear", "kill", "resume") if getattr(self, w)]
        if len(did) != 1:
            raise ValueError(f"a step does exactly one of inject, clear, kill, resume "
                             f"(got {', '.join(did) or 'none'})")
        if self.times > 1 and self.every_s is None:
            raise ValueError("times > 1 needs every_s")

    def expand(self) -> list[Step]:
        """The step and its repeats, each at its own time."""
        every = self.every_s or 0.0
        return [msgspec.structs.replace(self, at=self.at + n * every, every_s=None, times=1)
                for n in range(self.times)]


_DEFAULT_EXPECTED: dict[str, Expected] = {"control": "nothing", "self_clearing": "nothing"}


class Scenario(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    kind: ScenarioKind
    description: str = ""
    cause: str = ""
    cause_words: list[str] = []
    cures: list[str] = []
    # High-risk cures the eval's on-call approves when the governor holds them for a
    # human (as the demo's does): counted in approvals_asked either way.
    human_approves: list[str] = []
    expected: Expected | None = None
    steps: list[Step] = []
    limit_s: Seconds | None = None  # default: the campaign's (or the subject's)
    duration_s: Seconds = 20.0  # how long a scenario that wants nothing is watched
    subject: str = ""  # filled in by the loader: the kind whose catalog it is in

    def __post_init__(self) -> None:
        if self.kind == "control" and self.steps:
            raise ValueError(f"{self.name}: a control has no chaos steps (load only)")
        if self.kind != "control" and not any(s.inject for s in self.steps):
            raise ValueError(f"{self.name}: a {self.kind} scenario injects a fault")

    @property
    def right_answer(self) -> Expected:
        if self.expected is not None:
            return self.expected
        if self.kind in _DEFAULT_EXPECTED:
            return _DEFAULT_EXPECTED[self.kind]
        return "fix" if self.cures else "escalate"

    def timed_steps(self) -> list[Step]:
        return sorted((s for step in self.steps for s in step.expand()), key=lambda s: s.at)

    def faults(self) -> list[str]:
        return list(dict.fromkeys(s.inject for s in self.steps if s.inject))


class ScenarioFile(msgspec.Struct, forbid_unknown_fields=True):
    scenario: list[Scenario] = []


class Variant(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A crew under test, or none: `crew = false` is the baseline (does it heal alone?)."""

    crew: bool = True
    # claude: the real API (a key, and [llm]); scripted: a local stand-in of the Messages
    # API answering with the subject's runbook rules, for the Claude path's plumbing
    diagnoser: Literal["runbook", "claude", "scripted"] = "runbook"
    governor: dict[str, object] = {}  # [governor] keys over the eval's own (a policy)


BUILTIN_VARIANTS = {"runbook": Variant(), "claude": Variant(diagnoser="claude"),
                    "scripted": Variant(diagnoser="scripted"), "baseline": Variant(crew=False)}


class Campaign(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str = "campaign"
    subjects: list[str] = msgspec.field(default_factory=lambda: ["webshop"])
    scenarios: list[str] = []  # names; empty: every scenario of the subjects' catalogs
    variants: list[str] = msgspec.field(default_factory=lambda: ["runbook", "baseline"])
    variant: dict[str, Variant] = {}  # your own variants, by name, beside the built-ins
    repeats: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    limit_s: Seconds | None = None  # per trial; default: the subject's
    settle_s: Seconds = 5.0  # the oracle must stay healthy this long to count a fix

    def variants_by_name(self) -> dict[str, Variant]:
        known = {**BUILTIN_VARIANTS, **self.variant}
        missing = [v for v in self.variants if v not in known]
        if missing:
            raise EvalConfigError(f"variants: unknown {missing}; known: {', '.join(known)}")
        return {v: known[v] for v in self.variants}


SMOKE = Campaign(name="smoke", subjects=["webshop"], scenarios=["pool_exhaustion", "quiet"],
                 variants=["runbook"], repeats=1)


def _decode(data: bytes, where: str) -> list[Scenario]:
    try:
        return msgspec.toml.decode(data, type=ScenarioFile).scenario
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EvalConfigError(f"{where}: {exc}") from None


def catalog(kind: str) -> list[Scenario]:
    """A subject kind's own scenarios (subjects/<kind>/scenarios.toml); [] if it ships none."""
    try:
        data = resources.files(f"subjects.{kind}").joinpath("scenarios.toml").read_bytes()
    except (FileNotFoundError, ModuleNotFoundError):
        return []
    return [msgspec.structs.replace(s, subject=kind)
            for s in _decode(data, f"subjects/{kind}/scenarios.toml")]


def load_extra(directory: Path, kinds: list[str]) -> list[Scenario]:
    """Every scenario in DIR/*.toml; each names its subject (`subject = "webshop"`) unless
    the campaign has only one."""
    out = []
    for path in sorted(directory.glob("*.toml")):
        for s in _decode(path.read_bytes(), str(path)):
            subject = s.subject or (kinds[0] if len(kinds) == 1 else "")
            if subject not in kinds:
                raise EvalConfigError(f"{path}: scenario {s.name!r}: subject "
                                      f"{s.subject or '(none)'} is not in the campaign "
                                      f"({', '.join(kinds)})")
            out.append(msgspec.structs.replace(s, subject=subject))
    return out


def load_campaign(path: Path) -> Campaign:
    try:
        return msgspec.toml.decode(path.read_bytes(), type=Campaign)
    except OSError as exc:
        raise EvalConfigError(f"cannot read {path}: {exc.strerror}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EvalConfigError(f"{path}: {exc}") from None


def chosen(campaign: Campaign, extra: list[Scenario]) -> list[Scenario]:
    """The campaign's scenarios, in catalog order; EvalConfigError naming what is wrong."""
    pool: dict[tuple[str, str], Scenario] = {}
    for s in [sc for kind in campaign.subjects for sc in catalog(kind)] + extra:
        key = (s.subject, s.name)
        if key in pool:
            raise EvalConfigError(f"scenario {s.name!r} of {s.subject} is defined twice")
        pool[key] = s
    if not campaign.scenarios:
        return list(pool.values())
    picked = [s for s in pool.values() if s.name in campaign.scenarios]
    missing = sorted(set(campaign.scenarios) - {s.name for s in picked})
    if missing:
        raise EvalConfigError(f"scenarios: unknown {missing}; known: "
                              f"{', '.join(sorted({n for _, n in pool}))}")
    return picked
