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


def _log_file(cfg: Any) -> Path | None:
    """The manager's journal (node logs sit beside it): the Target's `log_file`, else the
    embedded subject's default under its `data_dir`."""
    log_file = getattr(cfg, "log_file", None)
    if isinstance(log_file, str | Path) and str(log_file):
        return Path(log_file)
    data_dir = getattr(cfg, "data_dir", None)
    return Path(data_dir) / "logs" / "app.log" if data_dir else None


def make_observer(cfg: Any) -> RatelimiterObserver:
    """`cfg` (the monitor's Target) has `url` (the manager, whose /topology is the live
    inventory: node ports are picked at start and the primary moves on a failover) and
    `log_file` or `data_dir`."""
    return RatelimiterObserver(str(cfg.url), _log_file(cfg))


def make_action_client(cfg: Any) -> HttpActionClient:
    """`cfg` has `url`: the manager runs the remedies (/actions/<name>)."""
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
