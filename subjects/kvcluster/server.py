"""The embedded subject, one launcher process: the three members, the load and the chaos port.

`menders up` runs it for a configured kvcluster (`python -m subjects.kvcluster
serve`): member k on base+2k (client) and base+2k+1 (peer), the load
generator's /metrics on base+6, cluster.json, data dirs, pid files and member
logs under --data-dir. The chaos port (loopback only, never in the config)
takes `POST /faults/<name>` and `DELETE /faults/<name>` like the webshop's, and
`GET /oracle` (subjects/kvcluster/oracle.py). On SIGTERM it stops the members it
started.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, start_http_server

from subjects.chaoshttp import add_oracle
from subjects.kvcluster import chaos
from subjects.kvcluster.layout import LOADGEN_PORT_OFFSET, from_base_port
from subjects.kvcluster.loadgen import LoadMetrics, run_load
from subjects.kvcluster.options import KvClusterOptions
from subjects.kvcluster.oracle import KvClusterOracle, OwnedProcessManager
from subjects.kvcluster.procman import LocalProcessManager

REAP_EVERY_S = 1.0

Faults = web.AppKey("faults", dict)


def make_chaos_app(faults: dict[str, chaos.Fault],
                   oracle: KvClusterOracle | None = None) -> web.Application:
    """The chaos port; with `oracle`, also `GET /oracle` (subjects/chaoshttp.py)."""
    app = web.Application()
    if oracle is not None:
        add_oracle(app, oracle.checks, oracle.effects)
    app[Faults] = {"faults": faults, "injected": {}}

    def fault_of(request: web.Request) -> chaos.Fault:
        name = request.match_info["name"]
        if name not in faults:
            raise web.HTTPNotFound(text=f"unknown fault {name!r}; known: {', '.join(faults)}\n")
        return faults[name]

    def listing() -> dict[str, dict[str, object]]:
        injected = app[Faults]["injected"]
        return {n: {"injected_at": ts, "effective": faults[n].effective()}
                for n, ts in injected.items()}

    async def inject(request: web.Request) -> web.Response:
        fault = fault_of(request)
        await fault.inject()
        app[Faults]["injected"][fault.name] = time.time()
        return web.json_response({"ok": True, "fault": fault.name, "active": listing()})

    async def clear(request: web.Request) -> web.Response:
        fault = fault_of(request)
        await fault.clear()
        app[Faults]["injected"].pop(fault.name, None)
        return web.json_response({"ok": True, "fault": fault.name, "active": listing()})

    async def show(_: web.Request) -> web.Response:
        return web.json_response({"faults": sorted(faults), "active": listing()})

    app.router.add_get("/faults", show)
    app.router.add_post("/faults/{name}", inject)
    app.router.add_delete("/faults/{name}", clear)
    return app


async def _reap(procman: LocalProcessManager) -> None:
    """Members killed by others (chaos, the executor) are our children: reap them."""
    while True:
        for name in procman.layout.names:
            procman.pid(name)
        await asyncio.sleep(REAP_EVERY_S)


async def serve(host: str, port: int, chaos_port: int, data_dir: Path,
                options: KvClusterOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    layout = from_base_port(data_dir, port, host)
    layout.save()
    procman = OwnedProcessManager(layout)
    # Its effect tracker runs from before the first member starts: the crew's action
    # client reaches the members directly, as soon as they answer.
    oracle = KvClusterOracle(layout, procman)
    oracle.start()
    await chaos.start_cluster(layout, procman, timeout_s=30.0)
    registry = CollectorRegistry()
    metrics = LoadMetrics(registry)
    start_http_server(port + LOADGEN_PORT_OFFSET, addr=host, registry=registry)
    faults = {name: cls(layout, procman) for name, cls in chaos.FAULTS.items()}
    runner = web.AppRunner(make_chaos_app(faults, oracle))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", chaos_port).start()
    tasks = [loop.create_task(_reap(procman))]
    if options.load_rps > 0:
        tasks.append(loop.create_task(run_load(list(layout.endpoints.values()),
                                               options.load_rps, metrics)))
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await runner.cleanup()
        await oracle.close()
        await asyncio.to_thread(procman.stop_all)
