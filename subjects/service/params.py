"""A TOML parameter schema (type, range, enum, pattern) made into a real msgspec Struct.

The executor, the governor and the Claude tool schema all take an ActionSpec's `params`
Struct; a declared action gets one too, so its parameters are validated exactly like a
built-in action's, before any template sees them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

ParamType = Literal["int", "float", "str", "bool"]
_PYTHON: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
NAME = r"^[a-z_][a-z0-9_]{0,63}$"
MAX_STR = 256  # a declared string parameter is never longer (the default max_length)


class ParamDecl(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    type: ParamType
    description: str = ""
    min: float | None = None  # int and float: inclusive bounds
    max: float | None = None
    enum: list[str | int | float] = []
    pattern: str = ""  # str: the whole value must match (re.fullmatch)
    max_length: Annotated[int, msgspec.Meta(ge=1, le=4096)] = MAX_STR
    default: str | int | float | bool | None = None  # None: the parameter is required

    def check(self) -> None:
        """ValueError for a declaration that cannot be right (called by its action's check,
        which names the key)."""
        numeric = self.type in ("int", "float")
        if (self.min is not None or self.max is not None) and not numeric:
            raise ValueError(f"min/max apply to int and float, not {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        if self.pattern:
            if self.type != "str":
                raise ValueError(f"pattern applies to str, not {self.type}")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} does not compile: {exc}") from None
        for value in self.enum:
            try:
                msgspec.convert(value, self.annotation(with_enum=False))
            except msgspec.ValidationError as exc:
                raise ValueError(f"enum value {value!r}: {exc}") from None
        if self.default is not None:
            try:
                msgspec.convert(self.default, self.annotation())
            except msgspec.ValidationError as exc:
                raise ValueError(f"default {self.default!r}: {exc}") from None

    @property
    def constrained(self) -> bool:
        """Whether a str value is bounded to a declared shape (pattern or enum): only such
        a value may reach an argv or a unit name."""
        return self.type != "str" or bool(self.pattern or self.enum)

    def annotation(self, with_enum: bool = True) -> Any:
        if with_enum and self.enum:
            return Literal[tuple(self.enum)]
        base = _PYTHON[self.type]
        if self.type == "bool":
            return bool
        description = self.description or None
        if self.type == "str":
            pattern = _anchored(self.pattern) if self.pattern else None
            meta = msgspec.Meta(max_length=self.max_length, pattern=pattern,
                                description=description)
        else:
            cast = int if self.type == "int" else float
            meta = msgspec.Meta(ge=None if self.min is None else cast(self.min),
                                le=None if self.max is None else cast(self.max),
                                description=description)
        return Annotated[base, meta]


def _anchored(pattern: str) -> str:
    """msgspec's `pattern` is a search; a declared pattern must match the whole value.
    `\\Z`, not `$`: `$` also matches before a trailing newline ("a\\n" would pass `^a$`)."""
    return rf"\A(?:{pattern})\Z"


def params_struct(action: str, params: dict[str, ParamDecl]) -> type[msgspec.Struct]:
    """The Struct for one action's parameters: required ones first, unknown keys refused."""
    required = [(n, p.annotation()) for n, p in params.items() if p.default is None]
    optional = [(n, p.annotation(), p.default) for n, p in params.items()
                if p.default is not None]
    return msgspec.defstruct(f"{action}_params", [*required, *optional],
                             forbid_unknown_fields=True, kw_only=True)
