"""Managed subjects: one package per system under management.

A kind is found by name: the built-in ones, and any installed distribution's entry
point in the `menders.subjects` group whose value is a SubjectDefinition, e.g. in its
pyproject.toml:

    [project.entry-points."menders.subjects"]
    mykind = "mykind.definition:DEFINITION"
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
from collections.abc import Mapping
from functools import cache
from typing import Any, Protocol

import msgspec

from subjects.base import SubjectDefinition


class _Subject(Protocol):
    """A subject's config as subjects sees it (actors' SubjectConfig has it)."""

    @property
    def kind(self) -> str: ...

    @property
    def options(self) -> dict[str, Any]: ...


class Configured(Protocol):
    """What subjects need of a config (actors.runtime.config.Config has it): no import of it."""

    @property
    def subjects(self) -> Mapping[str, _Subject]: ...


ENTRY_POINT_GROUP = "menders.subjects"
# The kinds this repo ships, registered in pyproject.toml like any plugin. They are
# also known here, so a source checkout that was never installed still runs, and so a
# third-party package can never replace one (its entry point is ignored, with a warning).
BUILTIN: dict[str, str] = {
    "webshop": "subjects.webshop.definition:DEFINITION",
    "ratelimiter": "subjects.ratelimiter.definition:DEFINITION",
    "kvcluster": "subjects.kvcluster.definition:DEFINITION",
    "service": "subjects.service.definition:DEFINITION",
}
KINDS = tuple(BUILTIN)
log = logging.getLogger("menders.subjects")


@cache
def _registered() -> dict[str, str]:
    """kind -> "module:attribute", the built-ins first, then the `menders.subjects`
    entry points of every installed distribution."""
    found = dict(BUILTIN)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN:
            if ep.value != BUILTIN[ep.name]:
                log.warning("subject kind %r is built in: the entry point %r of %s is "
                            "ignored", ep.name, ep.value, ep.dist.name if ep.dist else "?")
            continue
        found.setdefault(ep.name, ep.value)
    return found


def kinds() -> tuple[str, ...]:
    """Every subject kind this installation can manage: built-ins, then plugins."""
    return tuple(_registered())


def is_builtin(kind: str) -> bool:
    return kind in BUILTIN


def embeddable(kind: str) -> bool:
    """Whether `menders up` can run a subject of this kind itself: a built-in kind that
    ships its own service (not `service`, which is always someone else's)."""
    return is_builtin(kind) and not load(kind).extra.get("external", False)


@cache
def load(kind: str) -> SubjectDefinition:
    """The definition of a subject kind (never its chaos hooks). KeyError for a kind
    nobody registered; TypeError for an entry point that is not a SubjectDefinition of
    that kind."""
    target = _registered().get(kind)
    if target is None:
        raise KeyError(f"unknown subject kind {kind!r}; installed: {', '.join(kinds())}")
    module, _, attribute = target.partition(":")
    definition = getattr(importlib.import_module(module), attribute or "DEFINITION")
    if not isinstance(definition, SubjectDefinition) or definition.kind != kind:
        raise TypeError(f"subject kind {kind!r}: {target} is not a SubjectDefinition of "
                        f"kind {kind!r}")
    return definition


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
        text = str(exc)
        if " - at `$" in text:
            raise ValueError(f"options: {exc}".replace("`$", "`options")) from None
        key, sep, what = text.partition(": ")
        if sep and re.fullmatch(r"[\w.\[\]-]+", key):  # a kind's check named the key
            raise ValueError(f"options.{key}: {what}") from None
        raise ValueError(f"options: {text}") from None


def definition_of(cfg: _Subject) -> SubjectDefinition:
    """One configured subject's definition. Most kinds have one for all their subjects; a
    kind whose definition is its config (`service`) makes one per subject from its
    options (`extra["specialise"]`). Raises as `load` and `validate_options` do."""
    definition = load(cfg.kind)
    if "specialise" not in definition.extra:
        return definition
    return _specialised(cfg.kind, msgspec.json.encode(cfg.options))


@cache
def _specialised(kind: str, options: bytes) -> SubjectDefinition:
    """Keyed by the options' JSON, so every actor of a process shares one per subject."""
    validated = validate_options(kind, msgspec.json.decode(options))
    specialised = load(kind).extra["specialise"](validated)
    if not isinstance(specialised, SubjectDefinition) or specialised.kind != kind:
        raise TypeError(f"subject kind {kind!r}: specialise() did not return a "
                        f"SubjectDefinition of kind {kind!r}")
    return specialised


def definition_for(config: Configured, subject: str) -> SubjectDefinition | None:
    """The definition of a configured managed subject; None for one not configured.

    Actors act only on the subjects in their config: an event about any other
    is not theirs to judge (fail closed), whatever its name suggests.
    """
    cfg = config.subjects.get(subject)
    if cfg is None:
        return None
    try:
        return definition_of(cfg)
    except (KeyError, ValueError):
        return None
