"""The chaos HTTP protocol, the service's side: how a demo, a bench or a test breaks a subject.

A subject's chaos port (loopback only, in no config an actor reads) serves
`GET /faults` -> `{"faults": [every name], "active": {...}}`, `POST /faults/<name>`
to inject and `DELETE /faults/<name>` to clear -> `{"ok": true, "fault": name}`
(plus the active faults, where the subject says so), and, where the subject can
return to its healthy baseline, `POST /reset` -> `{"ok": true}`. An unknown fault
is a 404 whose text names the known ones. Every subject with a chaos object
serves it through `chaos_app` here; the callers (`menders demo`, the bench, the
tests) speak plain HTTP to it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from aiohttp import web


class ChaosHooks(Protocol):
    """What a subject's chaos object offers: its faults by name, injected and cleared by name."""

    @property
    def faults(self) -> Mapping[str, object]: ...

    async def inject(self, name: str) -> None: ...

    async def clear(self, name: str) -> None: ...

    def listing(self) -> Mapping[str, object]:
        """The faults injected and not cleared, as `GET /faults` shows them."""
        ...


def chaos_app(chaos: ChaosHooks, *, reset: Callable[[], Awaitable[None]] | None = None,
              active_in_replies: bool = True) -> web.Application:
    """The chaos port's application. `reset`, when given, is served as `POST /reset`;
    `active_in_replies`: inject and clear answer with the active faults too."""

    def fault_name(request: web.Request) -> str:
        name = request.match_info["name"]
        if name not in chaos.faults:
            known = ", ".join(chaos.faults)
            raise web.HTTPNotFound(text=f"unknown fault {name!r}; known: {known}\n")
        return name

    def done(name: str) -> web.Response:
        body: dict[str, object] = {"ok": True, "fault": name}
        if active_in_replies:
            body["active"] = chaos.listing()
        return web.json_response(body)

    async def inject(request: web.Request) -> web.Response:
        name = fault_name(request)
        await chaos.inject(name)
        return done(name)

    async def clear(request: web.Request) -> web.Response:
        name = fault_name(request)
        await chaos.clear(name)
        return done(name)

    async def show(_: web.Request) -> web.Response:
        return web.json_response({"faults": sorted(chaos.faults), "active": chaos.listing()})

    app = web.Application()
    app.router.add_get("/faults", show)
    app.router.add_post("/faults/{name}", inject)
    app.router.add_delete("/faults/{name}", clear)
    if reset is not None:
        run_reset = reset

        async def reset_all(_: web.Request) -> web.Response:
            await run_reset()
            return web.json_response({"ok": True})

        app.router.add_post("/reset", reset_all)
    return app
