"""The webshop's fault catalog: what its chaos hooks can break, and whether the crew can cure it.

Beside the chaos hooks (chaos.py) and, like them, never given to an actor:
the demo and the evals read it to know what to inject and what to expect.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FaultSpec:
    name: str  # the chaos hook's name (chaos.Fault.name)
    fixable: bool  # False: the right answer is an escalation, not a fix
    description: str
    # Actions whose steps the demo's on-call human approves (`menders approve`) when the
    # governor holds them for one: the high-risk repairs policy never runs unattended.
    human_approves: tuple[str, ...] = ()


FAULTS: tuple[FaultSpec, ...] = (
    FaultSpec("pool_exhaustion", True, "connections leaked from the pool"),
    FaultSpec("slow_dependency", True, "a slow dependency adds latency"),
    FaultSpec("bad_config", True, "a bad config version makes requests fail"),
    FaultSpec("memory_leak", True, "memory allocated and never freed"),
    FaultSpec("cache_off", True, "the cache turned off"),
    FaultSpec("log_flood", True, "the log directory filling up"),
    FaultSpec("upstream_down", False, "an upstream dependency down: escalate, do not thrash"),
)
