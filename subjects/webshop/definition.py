"""The webshop's SubjectDefinition: what actors know about it (never its chaos)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from subjects.actionhttp import HttpActionClient
from subjects.base import SubjectDefinition
from subjects.webshop.actions import ACTIONS
from subjects.webshop.invariants import INVARIANTS
from subjects.webshop.observer import WebshopObserver
from subjects.webshop.runbooks import RUNBOOKS


def make_observer(cfg: Any) -> WebshopObserver:
    """`cfg` (the monitor's Target) has `url: str` and `log_file: pathlib.Path | None`."""
    log_file = getattr(cfg, "log_file", None)
    return WebshopObserver(str(cfg.url), Path(log_file) if log_file else None)


def make_action_client(cfg: Any) -> HttpActionClient:
    """`cfg` has `url: str`."""
    return HttpActionClient(str(cfg.url))


DEFINITION = SubjectDefinition(
    kind="webshop",
    description="A web shop (aiohttp + SQLite behind a bounded pool, a payments upstream) "
                "under built-in load.",
    actions=ACTIONS,
    invariants=INVARIANTS,
    runbooks=RUNBOOKS,
    make_observer=make_observer,
    make_action_client=make_action_client,
)
