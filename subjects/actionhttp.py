"""The HTTP action protocol, both sides: how the executor asks a subject to act.

`POST <url>/actions/<name>` with the parameters as a JSON object; the subject
answers `{"ok": bool, "detail": str}`: 200 done, 400 the parameters were refused
(an ActionError, never retried as-is), 404 no such action, 413 too large, 500
the action failed. Every subject that serves actions over HTTP speaks exactly
this, through `action_route` here, and the executor calls it through
`HttpActionClient`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import aiohttp
import msgspec
from aiohttp import web

from bus_schemas.errors import MendersError
from subjects.base import ActionError, ActionSpec

MAX_ACTION_BODY = 64 * 1024
MAX_REPLY = 64 * 1024


class ActionFailed(MendersError, RuntimeError):
    """The service ran the action and reported failure, or did not answer."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class HttpActionClient:
    """The executor's side (ActionClientProtocol) for a subject at `url`."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def precondition(self, action: str, params: dict[str, Any]) -> str | None:
        """None: an HTTP subject checks its own preconditions when it runs an action."""
        return None

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
        if status == 400:  # the service refused the input: a retry cannot help
            raise ActionError(detail, code="invalid")
        if status != 200 or not ok:
            raise ActionFailed(detail or f"{action}: HTTP {status}", status)
        return detail

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Log(Protocol):
    def write(self, level: str, msg: str, **fields: Any) -> None: ...


Remedy = Callable[[web.Request, str, msgspec.Struct], Awaitable[str]]
Handler = Callable[[web.Request], Awaitable[web.Response]]


def reply(ok: bool, detail: str, status: int = 200) -> web.Response:
    return web.json_response({"ok": ok, "detail": detail}, status=status)


def action_route(actions: Mapping[str, ActionSpec], remedy: Remedy,
                 log: Callable[[web.Request], _Log],
                 failures: tuple[type[BaseException], ...] = (Exception,)) -> Handler:
    """The service's side: the `/actions/{name}` handler. It refuses unknown actions and
    bad parameters (validated by the ActionSpec before anything runs), runs `remedy`,
    and logs every action it ran (the subject's own record of effects) and every
    failure (one of `failures`)."""

    async def action(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        spec = actions.get(name)
        if spec is None:
            return reply(False, f"unknown action {name!r}; known: {', '.join(actions)}", 404)
        raw = await request.content.read(MAX_ACTION_BODY + 1)
        if len(raw) > MAX_ACTION_BODY:
            return reply(False, f"{name}: parameters larger than {MAX_ACTION_BODY} bytes", 413)
        try:
            params = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            return reply(False, f"{name}: parameters are not JSON: {exc}", 400)
        if not isinstance(params, dict):
            return reply(False, f"{name}: parameters must be a JSON object", 400)
        try:
            detail = await remedy(request, name, spec.validate(params))
        except ActionError as exc:
            return reply(False, str(exc), 400)
        except failures as exc:
            log(request).write("error", "action failed", action=name, error=repr(exc)[:300])
            return reply(False, f"{name} failed: {type(exc).__name__}: {exc}", 500)
        log(request).write("info", "action", action=name, params=params, detail=detail)
        return reply(True, detail)

    return action
