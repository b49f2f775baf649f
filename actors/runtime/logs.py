"""Structured JSON logs on stderr, one object per line, carrying the incident id."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator

_incident: contextvars.ContextVar[str] = contextvars.ContextVar("incident_id", default="")
_actor = "menders"
_STD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "actor": _actor,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if incident := _incident.get():
            out["incident_id"] = incident
        for key, value in vars(record).items():
            if key not in _STD and key not in out:
                out[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(actor: str, level: str = "INFO") -> None:
    global _actor
    _actor = actor
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


@contextlib.contextmanager
def bind_incident(incident_id: str) -> Iterator[None]:
    token = _incident.set(incident_id)
    try:
        yield
    finally:
        _incident.reset(token)
