"""One process: the service, its chaos app, its payments upstream and its load generator."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

from aiohttp import web

from subjects.webshop.chaos import Chaos, make_chaos_app
from subjects.webshop.loadgen import run_load
from subjects.webshop.payments import PaymentsService
from subjects.webshop.service import make_app
from subjects.webshop.shop import Shop
from subjects.webshop.shop_metrics import ShopMetrics

SHUTDOWN_TIMEOUT_S = 0.3


async def _start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True,
                      shutdown_timeout=SHUTDOWN_TIMEOUT_S).start()
    return runner


async def serve(host: str, port: int, chaos_port: int, data_dir: Path, load_rps: float) -> None:
    """Run until SIGTERM or SIGINT, then stop everything within about a second."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    payments = PaymentsService()
    await payments.start()
    shop = Shop(data_dir, payments.url, ShopMetrics())
    await shop.start()
    chaos = Chaos(shop, payments)
    runners = [await _start_site(make_app(shop), host, port),
               # The chaos port is loopback only, whatever host the service binds.
               await _start_site(make_chaos_app(chaos), "127.0.0.1", chaos_port)]
    load: asyncio.Task[None] | None = None
    if load_rps > 0:
        load = loop.create_task(run_load(f"http://127.0.0.1:{port}", load_rps))
    shop.logs.log.write("info", "webshop started", port=port, payments=payments.url,
                        load_rps=load_rps)
    try:
        await stop.wait()
    finally:
        shop.logs.log.write("info", "webshop stopping")
        if load is not None:
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
        await chaos.clear_all()
        for runner in runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        await payments.stop()
        await shop.close()
