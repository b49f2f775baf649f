"""The manager's HTTP face: `/topology` (the inventory), `/health` and `/actions/<name>`."""

from __future__ import annotations

import json

from aiohttp import web
from redis.exceptions import RedisError

from subjects.base import ActionError
from subjects.ratelimiter import remedies
from subjects.ratelimiter.actions import ACTIONS
from subjects.ratelimiter.cluster import Cluster, ClusterError

CLUSTER_KEY = web.AppKey("cluster", Cluster)
MAX_ACTION_BODY = 64 * 1024


def _reply(ok: bool, detail: str, status: int = 200) -> web.Response:
    return web.json_response({"ok": ok, "detail": detail}, status=status)


async def topology(request: web.Request) -> web.Response:
    return web.json_response(request.app[CLUSTER_KEY].topology())


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def action(request: web.Request) -> web.Response:
    cluster = request.app[CLUSTER_KEY]
    name = request.match_info["name"]
    spec = ACTIONS.get(name)
    if spec is None:
        return _reply(False, f"unknown action {name!r}; known: {', '.join(ACTIONS)}", 404)
    raw = await request.content.read(MAX_ACTION_BODY + 1)
    if len(raw) > MAX_ACTION_BODY:
        return _reply(False, f"{name}: parameters larger than {MAX_ACTION_BODY} bytes", 413)
    try:
        params = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        return _reply(False, f"{name}: parameters are not JSON: {exc}", 400)
    if not isinstance(params, dict):
        return _reply(False, f"{name}: parameters must be a JSON object", 400)
    try:
        detail = await remedies.run(cluster, name, spec.validate(params))
    except ActionError as exc:
        return _reply(False, str(exc), 400)
    except (ClusterError, RedisError, OSError) as exc:
        cluster.log.write("error", "action failed", action=name, error=repr(exc)[:300])
        return _reply(False, f"{name} failed: {type(exc).__name__}: {exc}", 500)
    cluster.log.write("info", "action", action=name, params=params, detail=detail)
    return _reply(True, detail)


def make_app(cluster: Cluster) -> web.Application:
    app = web.Application(client_max_size=MAX_ACTION_BODY)
    app[CLUSTER_KEY] = cluster
    app.router.add_get("/topology", topology)
    app.router.add_get("/health", health)
    app.router.add_post("/actions/{name}", action)
    return app
