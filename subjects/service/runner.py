"""The executor's side of a `service` subject: its declared http, command and systemd actions.

Parameters are validated by the action's Struct before any template sees them; a
command runs without a shell, with only the environment the config passes through, and
is killed (its own PID) when its timeout passes; its output is captured and truncated
into the result. Exit codes and HTTP statuses outside the declared ones fail the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from typing import Any

import aiohttp
import msgspec

from subjects.actionhttp import MAX_REPLY, ActionFailed
from subjects.base import ActionError
from subjects.service import templates
from subjects.service.options import ActionDecl, CommandAction, HttpAction, SystemdAction


def _truncated(data: bytes, limit: int) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more chars)"


class ServiceActionClient:
    """ActionClientProtocol for the actions a `service` subject declares."""

    def __init__(self, actions: Mapping[str, ActionDecl]) -> None:
        self.actions = actions
        self._session: aiohttp.ClientSession | None = None

    async def precondition(self, action: str, params: dict[str, Any]) -> str | None:
        return None  # nothing declared to check; the governor's blast radius still holds

    async def run(self, action: str, params: dict[str, Any], timeout_s: float) -> str:
        decl = self.actions.get(action)
        if decl is None:
            raise ActionError(f"{action}: not declared for this subject", code="invalid")
        try:
            typed = msgspec.to_builtins(msgspec.convert(params, decl.params_struct(action)))
        except msgspec.ValidationError as exc:
            raise ActionError(f"{action}: bad parameters: {exc}", code="invalid") from None
        if decl.http is not None:
            return await self._http(action, decl.http, typed, timeout_s)
        if decl.command is not None:
            return await _command(action, decl.command, typed, timeout_s)
        assert decl.systemd is not None
        return await _command(action, _systemctl(decl.systemd, typed), typed, timeout_s)

    async def _http(self, action: str, http: HttpAction, params: dict[str, Any],
                    timeout_s: float) -> str:
        headers = {k: templates.render(v, params) for k, v in http.headers.items()}
        for header, env in http.secret_headers.items():
            if env not in os.environ:
                raise ActionFailed(f"{action}: environment variable {env} (header {header}) "
                                   "is not set")
            headers[header] = os.environ[env]
        url = templates.render(http.url, params)
        body = None if http.body is None else templates.render_json(http.body, params)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.request(
                    http.method, url, json=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                raw, status = await resp.content.read(MAX_REPLY), resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ActionFailed(f"{action}: {http.method} {url}: no answer: "
                               f"{type(exc).__name__}: {exc}") from None
        detail = f"{http.method} {url}: HTTP {status}: {_truncated(raw, 500)}"
        if status in http.expect_status:
            return detail
        if 400 <= status < 500 and status not in (408, 429):
            raise ActionError(detail, code="invalid")  # the service refused the input
        raise ActionFailed(detail, status)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _systemctl(systemd: SystemdAction, params: dict[str, Any]) -> CommandAction:
    unit = templates.render(systemd.unit, params)
    user = ["--user"] if systemd.user else []
    # `--` ends systemctl's options: a unit name can never be read as one.
    return CommandAction(argv=[systemd.systemctl, *user, "--no-ask-password", systemd.verb,
                               "--", unit], env=["XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS"]
                         if systemd.user else [])


async def _command(action: str, command: CommandAction, params: dict[str, Any],
                   timeout_s: float) -> str:
    argv = [templates.render(a, params) for a in command.argv]
    env = {k: os.environ[k] for k in ("PATH", *command.env) if k in os.environ}
    env.update(command.set_env)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=command.cwd or None, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)  # its own process group: a timeout kills its children too
    except OSError as exc:
        raise ActionFailed(f"{action}: cannot run {argv[0]}: {exc.strerror or exc}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    detail = f"{argv[0]} exited {proc.returncode}: {_truncated(out, command.max_output)}"
    if proc.returncode not in command.ok_exit:
        raise ActionFailed(f"{action}: {detail}")
    return detail
