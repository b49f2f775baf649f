"""The action client: calls the ratelimiter's remediation endpoints."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from bus_schemas.errors import MendersError
from subjects.base import ActionError

MAX_REPLY = 64 * 1024


class ActionFailed(MendersError, RuntimeError):
    """The service ran the action and reported failure, or did not answer."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class RatelimiterActionClient:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def run(self, action: str, params: dict[str, Any], timeout_s: float) -> str:
        """The service's detail on success; ActionError on a 400, ActionFailed otherwise."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(
                    f"{self.url}/actions/{action}", json=params,
                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                raw = await resp.content.read(MAX_REPLY)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ActionFailed(f"{action}: no answer from {self.url}: "
                               f"{type(exc).__name__}: {exc}") from None
        try:
            reply = json.loads(raw)
            ok, detail = bool(reply["ok"]), str(reply["detail"])
        except (ValueError, KeyError, TypeError):
            raise ActionFailed(f"{action}: HTTP {status}: unreadable reply {raw[:200]!r}",
                               status) from None
        if status == 400:
            raise ActionError(detail)
        if status != 200 or not ok:
            raise ActionFailed(detail or f"{action}: HTTP {status}", status)
        return detail

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
