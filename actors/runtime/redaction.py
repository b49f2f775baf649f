"""Secrets stay home: what a user's logs and metrics leak is cut out before any text
reaches the model, an incident summary or incident memory.

Built-in patterns catch the usual leaks; `[redaction] patterns` adds the user's own
(regular expressions; a group, if any, is what is cut, else the whole match). Each
cut is replaced by `[REDACTED]` and counted: the count goes on the audit record (a
Diagnosis's `redactions`), never the secret. Redaction works on decoded values
(every string inside a structure), never on encoded JSON, so it cannot break the
delimiting of untrusted data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bus_schemas.errors import MendersError

MARK = "[REDACTED]"

# (name, pattern): a group 1, where present, is the secret; the rest stays as context.
BUILTIN: tuple[tuple[str, str], ...] = (
    ("pem_block", r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z0-9 ]*PRIVATE "
                  r"KEY-----"),
    ("bearer", r"(?i)\bbearer\s+([A-Za-z0-9._~+/=-]{8,})"),
    ("basic_auth_header", r"(?i)\bauthorization:\s*basic\s+([A-Za-z0-9+/=]{8,})"),
    ("url_password", r"\b[a-z][a-z0-9+.-]*://[^\s:/@]+:([^\s@/]+)@"),
    ("aws_access_key_id", r"\b((?:AKIA|ASIA)[0-9A-Z]{16})\b"),
    ("aws_secret", r"(?i)aws_?secret_?access_?key\W{0,3}[=:]\s*[\"']?([A-Za-z0-9/+=]{40})"),
    ("api_token", r"\b((?:sk-ant-|sk-|xox[abprs]-|ghp_|gho_|github_pat_|glpat-)"
                  r"[A-Za-z0-9_-]{16,})"),
    ("jwt", r"\b(eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"),
    ("secret_pair", r"(?i)\b(?:password|passwd|pwd|secret|token|api_?key|access_?key|"
                    r"client_?secret|auth)\b[\"']?\s*[=:]\s*[\"']?([^\s\"',;&]{3,})"),
)


class PatternError(MendersError, ValueError):
    """A configured pattern that does not compile, named by its position."""


class Redactor:
    def __init__(self, extra: Sequence[str] = ()) -> None:
        self.patterns: list[re.Pattern[str]] = [re.compile(p) for _, p in BUILTIN]
        for n, pattern in enumerate(extra):
            try:
                self.patterns.append(re.compile(pattern))
            except re.error as exc:
                raise PatternError(f"redaction.patterns[{n}] {pattern!r}: {exc}") from None

    def text(self, s: str) -> tuple[str, int]:
        """`s` with every secret cut, and how many were."""
        count = 0
        for pattern in self.patterns:
            def cut(mo: re.Match[str]) -> str:
                nonlocal count
                count += 1
                if mo.re.groups and mo.group(1) is not None:
                    start, end = mo.span(1)
                    base = mo.start()
                    whole = mo.group(0)
                    return whole[:start - base] + MARK + whole[end - base:]
                return MARK

            s = pattern.sub(cut, s)
        return s, count

    def data(self, obj: Any) -> tuple[Any, int]:
        """Every string inside dicts, lists and tuples cut the same way (keys kept:
        a key names a field, a value may carry the secret)."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, dict):
            out, total = {}, 0
            for k, v in obj.items():
                out[k], n = self.data(v)
                total += n
            return out, total
        if isinstance(obj, list | tuple):
            items, total = [], 0
            for v in obj:
                item, n = self.data(v)
                items.append(item)
                total += n
            return items, total
        return obj, 0


class Cuts:
    """A Redactor that counts every cut it made, for one diagnosis or one summary."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.count = 0

    def __call__(self, obj: Any) -> Any:
        out, n = self.redactor.data(obj)
        self.count += n
        return out
