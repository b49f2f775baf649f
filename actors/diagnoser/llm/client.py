"""One Messages API call, with two layers of retry and a hard deadline.

Layer one is the SDK's own `max_retries` (exponential backoff, honouring
retry-after) on 408/409/429/5xx/529 and connection errors. When it gives up,
layer two waits `retry_backoff_s` (doubling) and tries the whole call again,
`retry_attempts` times, never past the investigation's deadline. Then
`LlmUnavailable` says why, and the diagnoser answers from its runbooks.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic
from anthropic.types import Message

from actors.diagnoser.llm.usage import LlmMetrics, Tally
from actors.runtime.config import LlmConfig
from bus_schemas.errors import MendersError

RETRYABLE = (anthropic.RateLimitError, anthropic.InternalServerError,
             anthropic.APIConnectionError)  # 5xx incl. 529 overloaded; timeouts


class LlmUnavailable(MendersError):
    """The API could not give an answer in time: the reason, for the diagnosis."""


def outcome_of(exc: BaseException) -> str:
    if isinstance(exc, anthropic.RateLimitError):
        return "rate_limited"
    if isinstance(exc, anthropic.OverloadedError):
        return "overloaded"
    if isinstance(exc, anthropic.InternalServerError):
        return "server_error"
    if isinstance(exc, anthropic.APITimeoutError):
        return "timeout"
    if isinstance(exc, anthropic.APIConnectionError):
        return "connection"
    return "refused"


def describe(exc: BaseException) -> str:
    if isinstance(exc, anthropic.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        kind = err.get("type", "") if isinstance(err, dict) else ""
        return f"{type(exc).__name__} (HTTP {exc.status_code}{' ' + kind if kind else ''})"
    return type(exc).__name__


class LlmClient:
    def __init__(self, cfg: LlmConfig, metrics: LlmMetrics, api_key: str) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=cfg.base_url or None, max_retries=cfg.max_retries,
            timeout=cfg.timeout_s)

    async def close(self) -> None:
        await self.client.close()

    async def create(self, *, model: str, deadline: float, tally: Tally,
                     **request: Any) -> Message:
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LlmUnavailable("the wall-time budget ran out waiting for the API")
            try:
                async with asyncio.timeout(remaining):
                    resp = await self.client.messages.create(
                        model=model, timeout=min(self.cfg.timeout_s, remaining), **request)
            except TimeoutError:
                self.metrics.requests.labels(model=model, outcome="timeout").inc()
                raise LlmUnavailable(f"no answer within the {self.cfg.max_wall_s:g}s "
                                     "wall-time budget") from None
            except RETRYABLE as exc:
                self.metrics.requests.labels(model=model, outcome=outcome_of(exc)).inc()
                attempt += 1
                delay = self.cfg.retry_backoff_s * 2 ** (attempt - 1)
                tries = self.cfg.max_retries + 1
                if attempt > self.cfg.retry_attempts or time.monotonic() + delay >= deadline:
                    raise LlmUnavailable(f"{describe(exc)} on {attempt} call(s) of up to "
                                         f"{tries} tries each") from None
                await asyncio.sleep(delay)
                continue
            except anthropic.APIStatusError as exc:  # 400, 401, 403...: retrying cannot help
                self.metrics.requests.labels(model=model, outcome="refused").inc()
                raise LlmUnavailable(f"the API refused the request: {describe(exc)}") from None
            self.metrics.requests.labels(model=model, outcome="ok").inc()
            self.metrics.record(model, resp.usage, tally)
            return resp
