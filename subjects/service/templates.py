"""`{param}` templates in action URLs, bodies, headers and argv, checked at load time.

Only bare names are allowed (`{age}`; not `{age:>3}`, `{a.b}` or `{a[0]}`), so what a
template can reach is exactly the declared parameters. `{{` and `}}` are literal braces.
A value is substituted whole into the one string it appears in: an argv element stays
one argument whatever the value holds.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from typing import Any

from bus_schemas.errors import MendersError

_FORMATTER = string.Formatter()


class TemplateError(MendersError, ValueError):
    pass


def fields(template: str) -> list[str]:
    """The parameter names a template references; TemplateError for anything but `{name}`."""
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise TemplateError(f"bad template {template!r}: {exc}") from None
    names = []
    for _text, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise TemplateError(f"bad template {template!r}: only {{name}} of a declared "
                                "parameter may appear (no format spec, conversion, "
                                "attribute or index)")
        names.append(name)
    return names


def undeclared(templates: Iterable[str], declared: Iterable[str]) -> list[str]:
    """Names referenced by any template but not declared, in order of appearance."""
    known = set(declared)
    out: list[str] = []
    for template in templates:
        out += [n for n in fields(template) if n not in known and n not in out]
    return out


def text(value: Any) -> str:
    """How a typed parameter value is written into a template."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render(template: str, params: Mapping[str, Any]) -> str:
    return template.format_map({k: text(v) for k, v in params.items()})


def render_json(body: Any, params: Mapping[str, Any]) -> Any:
    """A JSON body template: a string that is exactly "{name}" takes the parameter's typed
    value (a number stays a number); any other string is rendered as text."""
    if isinstance(body, str):
        names = fields(body)
        if len(names) == 1 and body == f"{{{names[0]}}}":
            return params[names[0]]
        return render(body, params)
    if isinstance(body, list):
        return [render_json(v, params) for v in body]
    if isinstance(body, dict):
        return {k: render_json(v, params) for k, v in body.items()}
    return body


def strings_of(body: Any) -> list[str]:
    """Every string inside a JSON body template (keys are never templates)."""
    if isinstance(body, str):
        return [body]
    if isinstance(body, list):
        return [s for v in body for s in strings_of(v)]
    if isinstance(body, dict):
        return [s for v in body.values() for s in strings_of(v)]
    return []
