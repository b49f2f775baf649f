"""The upstream dependency: a payments HTTP service on its own loopback port."""

from __future__ import annotations

import itertools

from aiohttp import web


async def charge(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"charge": f"ch_{next(_ids)}", "order": body.get("order")})


_ids = itertools.count(1)


class PaymentsService:
    """Started once on a free port; stopping closes its site, starting reopens the same port."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_post("/charge", charge)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True,
                           shutdown_timeout=0.2)
        await site.start()
        if not self.port:
            self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
