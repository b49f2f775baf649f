"""The `service` kind's TOML: `[subjects.<name>.options]`, checked whole when it loads.

Every cross-reference is checked here, so `menders check-config` and start-up name the
key of a mistake: an invariant over a metric no source declares, a runbook rule naming
an invariant, action or parameter that does not exist, a template referencing an
undeclared parameter, a free-form string reaching an argv or a unit name.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Any, Literal

import msgspec

from bus_schemas.errors import MendersError
from bus_schemas.messages import RecommendedAction, Risk
from subjects.base import InvariantSpec, RetryPolicy, RunbookRule
from subjects.invariants import ALERT_NAME, ALERT_PREFIX
from subjects.rules import check_rules
from subjects.service import templates
from subjects.service.params import NAME, ParamDecl, params_struct

Reduce = Literal["max", "min", "sum", "avg", "count"]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=600)]
URL = r"^https?://[^\s{}]+$"  # a source URL is config, never a template
HEALTH_METRICS = ("health_ok", "health_ms")


class KeyedError(MendersError, ValueError):
    """A mistake at a key path (relative to the table being checked)."""

    def __init__(self, key: str, what: str) -> None:
        super().__init__(f"{key}: {what}" if key else what)
        self.key, self.what = key, what

    def under(self, parent: str) -> KeyedError:
        return KeyedError(f"{parent}.{self.key}" if self.key else parent, self.what)


def _check_name(key: str, name: str, what: str) -> None:
    if not re.fullmatch(NAME, name):
        raise KeyedError(key, f"bad {what} name (want {NAME})")


def plain(exc: msgspec.ValidationError, key: str) -> KeyedError:
    """msgspec's "Expected ... - at `$.x`" as a KeyedError at `key.x`."""
    what, _, where = str(exc).rpartition(" - at `$")
    if not what:
        return KeyedError(key, str(exc))
    return KeyedError(f"{key}{where.rstrip('`')}", what)


class PromQuery(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One named metric: an instant PromQL query, its vector reduced to one number."""

    promql: str
    reduce: Reduce = "max"
    # The value when the query returns no series (`count` of nothing is 0 either way);
    # None: the metric is missing from the observation.
    empty: float | None = 0.0


class ScrapedMetric(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One named metric from `metrics_url`: the samples of `name` whose labels include
    `labels`, reduced; `rate`: a counter's increase per second since the last scrape."""

    name: str
    labels: dict[str, str] = {}
    reduce: Reduce = "sum"
    rate: bool = False


class HttpAction(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    url: str  # a template: `{param}` of a declared parameter
    body: dict[str, Any] | list[Any] | None = None  # a JSON template; "{p}" keeps p's type
    headers: dict[str, str] = {}  # templates
    # header -> the environment variable holding its value (a token): the secret stays
    # in menders' environment, never in the config or the audit record.
    secret_headers: dict[str, str] = {}
    expect_status: tuple[int, ...] = (200, 201, 202, 204)


class CommandAction(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Run without a shell: each argv element is one argument, whatever a value holds."""

    argv: list[str]  # argv[0] is literal: a parameter never chooses the program
    cwd: str = ""
    env: list[str] = []  # names passed through from menders' environment; nothing else is
    set_env: dict[str, str] = {}  # literal values
    ok_exit: tuple[int, ...] = (0,)
    max_output: Annotated[int, msgspec.Meta(ge=0, le=65536)] = 4000


class SystemdAction(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    unit: str  # literal, or a template of one pattern- or enum-bounded parameter
    verb: Literal["restart", "reload", "start", "stop"]
    user: bool = False  # systemctl --user
    systemctl: str = "systemctl"


class ActionDecl(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    description: str
    risk: Risk = "low"
    idempotent: bool = False
    timeout_s: Seconds = 10.0
    disruptive: bool = False
    retry: RetryPolicy = RetryPolicy()
    params: dict[str, ParamDecl] = {}
    http: HttpAction | None = None
    command: CommandAction | None = None
    systemd: SystemdAction | None = None

    def check(self) -> None:
        """KeyedError naming the key (relative to the action) of the first mistake."""
        ways = [w for w in ("http", "command", "systemd") if getattr(self, w) is not None]
        if len(ways) != 1:
            raise KeyedError("", "declare exactly one of http, command, systemd "
                             f"(got {', '.join(ways) or 'none'})")
        for name, param in self.params.items():
            _check_name(f"params.{name}", name, "parameter")
            try:
                param.check()
            except ValueError as exc:
                raise KeyedError(f"params.{name}", str(exc)) from None
        if self.retry.attempts > 1 and not self.idempotent:
            raise KeyedError("retry", "only an idempotent action may retry (a repeated "
                             "call could double its effect)")
        for where, template in self.templates():
            try:
                missing = templates.undeclared([template], self.params)
            except templates.TemplateError as exc:
                raise KeyedError(where, str(exc)) from None
            if missing:
                raise KeyedError(where, f"the template references undeclared parameter(s) "
                                 f"{', '.join(missing)} (declared: "
                                 f"{', '.join(self.params) or 'none'})")
        self._check_argv()

    def templates(self) -> list[tuple[str, str]]:
        """(key path, template) of every template this action renders."""
        if self.http is not None:
            return ([("http.url", self.http.url)]
                    + [(f"http.headers.{k}", v) for k, v in self.http.headers.items()]
                    + [("http.body", s) for s in templates.strings_of(self.http.body)])
        if self.command is not None:
            return [(f"command.argv[{i}]", a) for i, a in enumerate(self.command.argv)]
        assert self.systemd is not None
        return [("systemd.unit", self.systemd.unit)]

    def _check_argv(self) -> None:
        """What reaches a process's argv or a unit name must be bounded to a declared shape,
        so a value can never become an option (`--force`) or another unit."""
        if self.command is not None:
            if not self.command.argv or templates.fields(self.command.argv[0]):
                raise KeyedError("command.argv[0]", "the program must be literal")
            if self.command.cwd and templates.fields(self.command.cwd):
                raise KeyedError("command.cwd", "must be literal")
        if self.command is None and self.systemd is None:
            return
        for where, template in self.templates():
            for name in templates.fields(template):
                if not self.params[name].constrained:
                    raise KeyedError(where, f"str parameter {name!r} reaches an argv; "
                                     "declare a pattern or an enum for it")

    def params_struct(self, name: str) -> type[msgspec.Struct]:
        return _params_struct(name, msgspec.json.encode(self.params))


@cache
def _params_struct(name: str, params: bytes) -> type[msgspec.Struct]:
    """One Struct class per declared schema, not one per validation."""
    return params_struct(name, msgspec.json.decode(params, type=dict[str, ParamDecl]))


class ServiceOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    description: str = ""
    prometheus_url: str = ""  # where `queries` go (its /api/v1/query)
    queries: dict[str, PromQuery] = {}
    metrics_url: str = ""  # a /metrics page in the Prometheus text format
    metrics: dict[str, ScrapedMetric] = {}
    health_url: str = ""  # answers an expected status: health_ok 1, health_ms its latency
    health_status: tuple[int, ...] = (200,)
    timeout_s: Seconds = 2.0  # per source, per scrape
    invariants: list[InvariantSpec] = []
    runbooks: list[RunbookRule] = []
    actions: dict[str, ActionDecl] = {}

    def __post_init__(self) -> None:
        for key in ("prometheus_url", "metrics_url", "health_url"):
            url = getattr(self, key)
            if url and not re.fullmatch(URL, url):
                raise KeyedError(key, f"{url!r} is not an http(s) URL")
        if self.queries and not self.prometheus_url:
            raise KeyedError("queries", "set prometheus_url to run them against")
        if self.metrics and not self.metrics_url:
            raise KeyedError("metrics", "set metrics_url to scrape them from")
        if not (self.queries or self.metrics or self.health_url):
            raise KeyedError("", "no observations: declare queries, metrics or a health_url")
        declared = self.metric_names()
        for table, names in (("queries", self.queries), ("metrics", self.metrics)):
            for name in names:
                _check_name(f"{table}.{name}", name, "metric")
                if name in HEALTH_METRICS:
                    raise KeyedError(f"{table}.{name}", "a health URL's metric: name yours "
                                     "otherwise")
        if dupes := sorted(set(self.queries) & set(self.metrics)):
            raise KeyedError(f"metrics.{dupes[0]}", "declared in queries too")
        for name, decl in self.actions.items():
            _check_name(f"actions.{name}", name, "action")
            try:
                decl.check()
            except KeyedError as exc:
                raise exc.under(f"actions.{name}") from None
        self._check_invariants(declared)
        self._check_runbooks(declared)

    def metric_names(self) -> list[str]:
        health = list(HEALTH_METRICS) if self.health_url else []
        return [*self.queries, *self.metrics, *health]

    def _check_invariants(self, declared: list[str]) -> None:
        seen: set[str] = set()
        for n, inv in enumerate(self.invariants):
            if inv.name in seen:
                raise KeyedError(f"invariants[{n}].name", f"{inv.name!r} is used twice")
            seen.add(inv.name)
            if inv.metric not in declared:
                raise KeyedError(f"invariants[{n}].metric", f"{inv.metric!r} is not "
                                 f"observed (declared: {', '.join(declared)})")
            for k, alert in enumerate(inv.alerts):
                if not re.fullmatch(ALERT_NAME, alert):
                    raise KeyedError(f"invariants[{n}].alerts[{k}]", f"{alert!r} is not "
                                     "an alert name (Prometheus: [A-Za-z_:][A-Za-z0-9_:]*)")

    def _check_runbooks(self, declared: list[str]) -> None:
        invariants = {inv.name for inv in self.invariants}
        for n, rule in enumerate(self.runbooks):
            where = f"runbooks[{n}]"
            if problems := check_rules([rule]):
                raise KeyedError(where, problems[0])
            if rule.invariant is not None and rule.invariant not in invariants and not (
                    rule.invariant.startswith(ALERT_PREFIX)):  # an alert's own invariant
                raise KeyedError(f"{where}.invariant", f"{rule.invariant!r} is not declared "
                                 f"(declared: {', '.join(invariants) or 'none'})")
            for metric in rule.when:
                if metric not in declared and not metric.startswith(ALERT_PREFIX):
                    raise KeyedError(f"{where}.when.{metric}", "not an observed metric")
            if not rule.actions and not rule.escalate:
                raise KeyedError(where, "give actions, or escalate = true")
            for k, rec in enumerate(rule.actions):
                self._check_recommended(f"{where}.actions[{k}]", rec)

    def _check_recommended(self, where: str, rec: RecommendedAction) -> None:
        steps = [(f"{where}.steps[{i}]", s.action, s.params) for i, s in enumerate(rec.steps)]
        for at, action, params in steps or [(where, rec.action, rec.params)]:
            decl = self.actions.get(action)
            if decl is None:
                raise KeyedError(f"{at}.action", f"{action!r} is not declared (declared: "
                                 f"{', '.join(self.actions) or 'none'})")
            try:
                msgspec.convert(params, decl.params_struct(action))
            except msgspec.ValidationError as exc:
                raise plain(exc, f"{at}.params") from None
