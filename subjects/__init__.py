"""Managed subjects: one package per system under management."""

from __future__ import annotations

from subjects.base import SubjectDefinition


def load(kind: str) -> SubjectDefinition:
    """The definition of a subject kind (never its chaos hooks)."""
    if kind == "webshop":
        from subjects.webshop.definition import DEFINITION

        return DEFINITION
    raise KeyError(f"unknown subject kind {kind!r}; known: webshop")
