"""The manager's HTTP face: `/topology` (the inventory), `/health` and `/actions/<name>`."""

from __future__ import annotations

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from subjects.actionhttp import MAX_ACTION_BODY, action_route
from subjects.ratelimiter import remedies
from subjects.ratelimiter.actions import ACTIONS
from subjects.ratelimiter.cluster import Cluster, ClusterError

CLUSTER_KEY = web.AppKey("cluster", Cluster)


async def topology(request: web.Request) -> web.Response:
    return web.json_response(request.app[CLUSTER_KEY].topology())


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _remedy(request: web.Request, name: str, params: msgspec.Struct) -> str:
    return await remedies.run(request.app[CLUSTER_KEY], name, params)


action = action_route(ACTIONS, _remedy, lambda request: request.app[CLUSTER_KEY].log,
                      failures=(ClusterError, RedisError, OSError))


def make_app(cluster: Cluster) -> web.Application:
    app = web.Application(client_max_size=MAX_ACTION_BODY)
    app[CLUSTER_KEY] = cluster
    app.router.add_get("/topology", topology)
    app.router.add_get("/health", health)
    app.router.add_post("/actions/{name}", action)
    return app
