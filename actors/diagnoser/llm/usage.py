"""Tokens, estimated cost and request outcomes, as Prometheus counters.

Prices are USD per million tokens, list prices of the model families; a
cache write costs 1.25x input, a cache read 0.1x (5-minute ephemeral cache).
`[llm] input_usd_per_mtok / output_usd_per_mtok` override them. The cost is
an estimate for dashboards, not a bill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.runtime.config import LlmConfig
from actors.runtime.metrics import ActorMetrics

# (input, output) USD per million tokens, by model-name prefix; first match wins.
PRICES: tuple[tuple[str, float, float], ...] = (
    ("claude-opus-4-1", 15.0, 75.0),
    ("claude-opus-4-0", 15.0, 75.0),
    ("claude-opus-4", 5.0, 25.0),
    ("claude-sonnet", 3.0, 15.0),
    ("claude-haiku-4", 1.0, 5.0),
    ("claude-3-5-haiku", 0.8, 4.0),
    ("claude-haiku", 0.25, 1.25),
)
DEFAULT_PRICE = (3.0, 15.0)
CACHE_WRITE_FACTOR = 1.25
CACHE_READ_FACTOR = 0.1


def price_of(model: str, cfg: LlmConfig) -> tuple[float, float]:
    if cfg.input_usd_per_mtok or cfg.output_usd_per_mtok:
        return cfg.input_usd_per_mtok, cfg.output_usd_per_mtok
    for prefix, pin, pout in PRICES:
        if model.startswith(prefix):
            return pin, pout
    return DEFAULT_PRICE


@dataclass
class Tally:
    """One investigation's (or summary's) usage, for its evidence line and budget."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    cost_usd: float = 0.0
    calls: int = 0

    @property
    def total(self) -> int:
        return self.input + self.output + self.cache_read + self.cache_write


class LlmMetrics:
    def __init__(self, metrics: ActorMetrics, cfg: LlmConfig) -> None:
        self.cfg = cfg
        self.tokens = metrics.counter(
            "menders_llm_tokens", "Tokens used, by model and kind (input, output, "
            "cache_read, cache_write)", ["model", "kind"])
        self.cost = metrics.counter(
            "menders_llm_cost_usd", "Estimated cost of the tokens used, in USD", ["model"])
        self.requests = metrics.counter(
            "menders_llm_requests", "Messages API calls by outcome (ok, rate_limited, "
            "overloaded, server_error, timeout, connection, refused)", ["model", "outcome"])
        self.turns = metrics.histogram(
            "menders_llm_investigation_turns", "Model calls per investigation", [],
            buckets=(1, 2, 3, 4, 5, 6, 8, 10, 15))
        self.fallbacks = metrics.counter(
            "menders_llm_fallbacks", "Diagnoses that fell back to the runbooks, by reason "
            "(api, budget, invalid)", ["reason"])

    def record(self, model: str, usage: Any, tally: Tally) -> None:
        """Count one response's `usage` (an anthropic Usage) into metrics and `tally`."""
        fresh = int(getattr(usage, "input_tokens", 0) or 0)
        out = int(getattr(usage, "output_tokens", 0) or 0)
        read = int(getattr(usage, "cache_read_input_tokens", 0) or 0)
        write = int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
        pin, pout = price_of(model, self.cfg)
        cost = (fresh * pin + out * pout + read * pin * CACHE_READ_FACTOR
                + write * pin * CACHE_WRITE_FACTOR) / 1_000_000
        for kind, n in (("input", fresh), ("output", out), ("cache_read", read),
                        ("cache_write", write)):
            if n:
                self.tokens.labels(model=model, kind=kind).inc(n)
        self.cost.labels(model=model).inc(cost)
        tally.input += fresh
        tally.output += out
        tally.cache_read += read
        tally.cache_write += write
        tally.cost_usd += cost
        tally.calls += 1
