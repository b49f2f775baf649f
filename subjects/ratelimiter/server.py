"""One manager process: the cluster (redis-servers and nodes), its chaos app and its load."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

from aiohttp import web

from subjects.ratelimiter.chaos import Chaos, make_chaos_app
from subjects.ratelimiter.cluster import Cluster
from subjects.ratelimiter.loadgen import run_load
from subjects.ratelimiter.options import RatelimiterOptions
from subjects.ratelimiter.service import make_app


async def _site(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.3)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner


async def serve(host: str, port: int, chaos_port: int, data_dir: Path,
                options: RatelimiterOptions) -> None:
    """Run until SIGTERM or SIGINT; every child is stopped by its PID on the way out."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cluster = Cluster(data_dir, options)
    tasks: list[asyncio.Task[None]] = []
    runners: list[web.AppRunner] = []
    try:
        await cluster.start()
        tasks.append(loop.create_task(cluster.reap_forever()))
        chaos_app = make_chaos_app(Chaos(cluster))  # first: its oracle counts every action
        runners = [await _site(make_app(cluster), host, port),
                   await _site(chaos_app, "127.0.0.1", chaos_port)]
        if options.load:
            tasks.append(loop.create_task(run_load(
                options.clients, lambda: [n.url for n in cluster.nodes])))
        cluster.log.write("info", "ratelimiter started", port=port, nodes=len(cluster.nodes))
        await stop.wait()
    finally:
        cluster.log.write("info", "ratelimiter stopping")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner in runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        await cluster.close()
