"""The `service` kind's SubjectDefinition: a template specialised per configured subject.

`DEFINITION` itself declares nothing (no actions, invariants or runbooks); each
configured subject's validated options make its own definition (`specialise`), which
every actor asks for through `subjects.definition_of(cfg)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from subjects.base import ActionSpec, SubjectDefinition
from subjects.service.observer import ServiceObserver
from subjects.service.options import ServiceOptions
from subjects.service.runner import ServiceActionClient


def _options(cfg: Any) -> ServiceOptions:
    """The monitor's Target carries the validated Struct; a SubjectConfig the raw table."""
    import msgspec

    options = getattr(cfg, "options", None)
    return options if isinstance(options, ServiceOptions) else msgspec.convert(
        options or {}, ServiceOptions)


def _log_file(cfg: Any) -> Path | None:
    for attr in ("log_file", "log_path"):
        value = getattr(cfg, attr, None)
        if value:
            return Path(value)
    return None


def specialise(options: ServiceOptions) -> SubjectDefinition:
    actions = {name: ActionSpec(name=name, description=decl.description,
                                params=decl.params_struct(name), risk=decl.risk,
                                idempotent=decl.idempotent, timeout_s=decl.timeout_s,
                                disruptive=decl.disruptive, retry=decl.retry)
               for name, decl in options.actions.items()}
    return SubjectDefinition(
        kind="service",
        description=options.description or DEFINITION.description,
        actions=actions,
        invariants=tuple(options.invariants),
        runbooks=tuple(options.runbooks),
        make_observer=lambda cfg: ServiceObserver(options, _log_file(cfg)),
        make_action_client=lambda _cfg: ServiceActionClient(options.actions),
        extra={"options": ServiceOptions, "external": True},
    )


DEFINITION = SubjectDefinition(
    kind="service",
    description="A service menders did not write, declared in TOML alone: PromQL, /metrics, "
                "health and log observations; invariants and runbooks; http, command and "
                "systemd actions.",
    actions={},
    invariants=(),
    runbooks=(),
    make_observer=lambda cfg: ServiceObserver(_options(cfg), _log_file(cfg)),
    make_action_client=lambda cfg: ServiceActionClient(_options(cfg).actions),
    extra={"options": ServiceOptions, "specialise": specialise, "external": True},
)
