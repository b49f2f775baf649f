"""`menders check-config`: every problem of a config file, each with its key path.

`config.load` stops at the first error (msgspec's decode does). This decodes the TOML
once, then validates each section and each subject on its own, so one run lists every
bad key, and then checks what only the whole config can say: that the allow-list names
configured subjects and registered actions, and that each kind's runbooks parse.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec

import subjects
from actors.runtime.config import ALLOW_ALL, Config, SubjectConfig
from subjects.rules import check_rules


def problems_of(path: str | Path) -> list[str]:
    """Every problem found, as "<$.key.path>: <what is wrong>"; [] for a good config."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return [f"cannot read {path}: {exc.strerror}"]
    try:
        doc: Any = msgspec.toml.decode(raw)
    except msgspec.DecodeError as exc:
        return [f"not valid TOML: {exc}"]
    if not isinstance(doc, dict):
        return ["$: the config must be a table"]
    out: list[str] = []
    fields = {f.name: f.type for f in msgspec.structs.fields(Config)}
    for key, value in doc.items():
        if key not in fields:
            out.append(f"$.{key}: unknown section (known: {', '.join(sorted(fields))})")
        elif key == "subjects":
            out += _subjects(value)
        else:
            try:
                msgspec.convert(value, fields[key])
            except msgspec.ValidationError as exc:
                out.append(_at(f"$.{key}", exc))
    if out:
        return out
    config = msgspec.convert(doc, Config)
    return _whole(config)


def _at(prefix: str, exc: msgspec.ValidationError) -> str:
    """msgspec says "... - at `$.x`" relative to what it converted: rebase the path. A
    kind's options check names its key ("options.actions.x: ..."): join it on too."""
    text = str(exc)
    if " - at `$" in text:
        what, _, where = text.rpartition(" - at `$")
        prefix, text = f"{prefix}{where.rstrip('`')}", what
    key, sep, what = text.partition(": ")
    if sep and re.fullmatch(r"options[\w.\[\]-]*", key):
        return f"{prefix}.{key}: {what}"
    return f"{prefix}: {text}"


def _subjects(value: Any) -> list[str]:
    if not isinstance(value, dict):
        return ["$.subjects: must be a table of subjects"]
    out = []
    for name, body in value.items():
        try:
            msgspec.convert(body, SubjectConfig)
        except msgspec.ValidationError as exc:
            out.append(_at(f"$.subjects.{name}", exc))
    return out


def _whole(config: Config) -> list[str]:
    out = []
    kinds = {name: sc.kind for name, sc in config.subjects.items()}
    registries: dict[str, dict[str, Any]] = {}
    for name, sc in config.subjects.items():
        try:
            definition = subjects.definition_of(sc)
        except (KeyError, TypeError, ImportError, ValueError) as exc:
            out.append(f"$.subjects.{name}.kind: {exc}")
            continue
        registries[name] = dict(definition.actions)
        out += [f"$.subjects.{name} (kind {sc.kind}) runbooks: {p}"
                for p in check_rules(definition.runbooks)]
    for n, route in enumerate(config.alertmanager.routes):
        if route.subject not in kinds:
            out.append(f"$.alertmanager.routes[{n}].subject: no subject {route.subject!r} "
                       f"is configured (subjects: {', '.join(kinds) or 'none'})")
    for name, allowed in config.governor.allow.items():
        if name not in kinds:
            out.append(f"$.governor.allow.{name}: no subject {name!r} is configured "
                       f"(subjects: {', '.join(kinds) or 'none'})")
            continue
        if name not in registries:
            continue  # reported above
        registered = registries[name]
        for n, action in enumerate(allowed):
            if action != ALLOW_ALL and action not in registered:
                out.append(f"$.governor.allow.{name}[{n}]: action {action!r} is not "
                           f"registered for kind {kinds[name]!r} (registered: "
                           f"{', '.join(registered)})")
    return out
