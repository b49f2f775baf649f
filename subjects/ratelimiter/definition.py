"""The ratelimiter's SubjectDefinition: what actors know about it (never its chaos)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from subjects.actionhttp import HttpActionClient
from subjects.base import SubjectDefinition
from subjects.ratelimiter.actions import ACTIONS
from subjects.ratelimiter.invariants import INVARIANTS
from subjects.ratelimiter.observer import RatelimiterObserver
from subjects.ratelimiter.options import RatelimiterOptions
from subjects.ratelimiter.runbooks import RUNBOOKS


def make_observer(cfg: Any) -> RatelimiterObserver:
    """`cfg` has `url` (the manager) and `log_file` (its journal; node logs sit beside it)."""
    log_file = getattr(cfg, "log_file", None)
    if callable(log_file):  # SubjectConfig.log_file(home, name) needs arguments we lack
        log_file = None
    return RatelimiterObserver(str(cfg.url), Path(log_file) if log_file else None)


def make_action_client(cfg: Any) -> HttpActionClient:
    return HttpActionClient(str(cfg.url))


DEFINITION = SubjectDefinition(
    kind="ratelimiter",
    description="A sliding-window rate limiter: limiter nodes (aiohttp) sharing a real "
                "redis-server primary with a replica, under built-in load.",
    actions=ACTIONS,
    invariants=INVARIANTS,
    runbooks=RUNBOOKS,
    make_observer=make_observer,
    make_action_client=make_action_client,
    extra={"options": RatelimiterOptions},
)
