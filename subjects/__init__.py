"""Managed subjects: one package per system under management."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from subjects.base import SubjectDefinition


class _Kinded(Protocol):
    @property
    def kind(self) -> str: ...


class Configured(Protocol):
    """What subjects need of a config (actors.runtime.config.Config has it): no import of it."""

    @property
    def subjects(self) -> Mapping[str, _Kinded]: ...


def load(kind: str) -> SubjectDefinition:
    """The definition of a subject kind (never its chaos hooks)."""
    if kind == "webshop":
        from subjects.webshop.definition import DEFINITION

        return DEFINITION
    if kind == "ratelimiter":
        from subjects.ratelimiter.definition import DEFINITION as RATELIMITER

        return RATELIMITER
    if kind == "kvcluster":
        from subjects.kvcluster.definition import DEFINITION as KVCLUSTER

        return KVCLUSTER
    raise KeyError(f"unknown subject kind {kind!r}; known: {', '.join(KINDS)}")


KINDS = ("webshop", "ratelimiter", "kvcluster")


def validate_options(kind: str, options: dict[str, Any]) -> msgspec.Struct | None:
    """A kind's own settings (`[subjects.<name>.options]`), checked by the Struct it declares
    as `extra["options"]`; ValueError naming the key. A kind without one takes none."""
    spec = load(kind).extra.get("options")
    if spec is None:
        if options:
            raise ValueError(f"kind {kind!r} takes no options, got {sorted(options)}")
        return None
    try:
        return msgspec.convert(options, spec)
    except msgspec.ValidationError as exc:
        raise ValueError(f"options: {exc}".replace("`$", "`options")) from None


def definition_for(config: Configured, subject: str) -> SubjectDefinition | None:
    """The definition of a configured managed subject; None for one not configured.

    Actors act only on the subjects in their config: an event about any other
    is not theirs to judge (fail closed), whatever its name suggests.
    """
    cfg = config.subjects.get(subject)
    if cfg is None:
        return None
    try:
        return load(cfg.kind)
    except KeyError:
        return None
