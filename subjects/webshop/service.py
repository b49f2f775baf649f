"""The webshop's HTTP service: business routes, /health, /metrics and /actions/<name>."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from subjects.actionhttp import MAX_ACTION_BODY, action_route
from subjects.webshop.actions import ACTIONS, RollbackConfigParams, ScalePoolParams
from subjects.webshop.db import PRODUCTS, PoolTimeout
from subjects.webshop.shop import ConfigError, Shop, UpstreamError

SHOP_KEY = web.AppKey("shop", Shop)
BUSINESS_PREFIXES = ("/products", "/search", "/checkout")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _failure(exc: BaseException) -> tuple[int, str] | None:
    """The status a known failure maps to; None for an unexpected one."""
    if isinstance(exc, PoolTimeout):
        return 503, f"PoolTimeout: {exc}"
    if isinstance(exc, ConfigError):
        return 500, f"ConfigError: {exc}"
    if isinstance(exc, UpstreamError):
        return 502, f"UpstreamError: {exc}"
    return None


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Measure, count and log every business request as actually served."""
    if not request.path.startswith(BUSINESS_PREFIXES):
        return await handler(request)
    shop = request.app[SHOP_KEY]
    route = _route_of(request)
    task = asyncio.current_task()
    assert task is not None
    started = time.perf_counter()
    shop.worker.inflight.add(task)
    shop.metrics.inflight.inc()
    error = ""
    http_error: web.HTTPException | None = None
    response: web.StreamResponse
    try:
        shop.config.apply_pricing()
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        status, error = exc.status, exc.reason
        http_error = response = exc
    except asyncio.CancelledError:
        if task not in shop.worker.dropped:
            raise
        shop.worker.dropped.discard(task)
        task.uncancel()
        status, error = 503, "request dropped by worker restart"
        response = web.json_response({"error": error}, status=status)
    except Exception as exc:
        known = _failure(exc)
        status, error = known or (500, f"{type(exc).__name__}: {exc}")
        if isinstance(exc, PoolTimeout):
            shop.metrics.pool_timeouts.inc()
        response = web.json_response({"error": error[:300]}, status=status)
    finally:
        shop.worker.inflight.discard(task)
        shop.metrics.inflight.dec()
    seconds = time.perf_counter() - started
    shop.metrics.requests.labels(route, str(status)).inc()
    shop.metrics.latency.labels(route).observe(seconds)
    fields: dict[str, Any] = {"route": route, "method": request.method, "status": status,
                              "latency_ms": round(seconds * 1000, 1)}
    if error:
        fields["error"] = error[:300]
    if status >= 500:
        shop.logs.log.write("error", "request failed", **fields)
    else:
        shop.logs.log.write("info", "request", **fields)
    if http_error is not None:
        raise http_error
    return response


async def product(request: web.Request) -> web.Response:
    try:
        pid = int(request.match_info["id"])
    except ValueError:
        raise web.HTTPBadRequest(reason="product id must be an integer") from None
    found = await request.app[SHOP_KEY].product(pid)
    if found is None:
        raise web.HTTPNotFound(reason=f"no product {pid}")
    return web.json_response(found)


async def listing(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SHOP_KEY].listing())


async def search(request: web.Request) -> web.Response:
    term = request.query.get("q", "")
    if not term:
        raise web.HTTPBadRequest(reason="query parameter q is required")
    return web.json_response(await request.app[SHOP_KEY].search(term))


class CheckoutBody(msgspec.Struct, forbid_unknown_fields=True):
    product_id: int
    qty: int = 1


async def checkout(request: web.Request) -> web.Response:
    try:
        body = msgspec.json.decode(await request.read(), type=CheckoutBody)
    except msgspec.DecodeError as exc:
        raise web.HTTPBadRequest(reason=f"bad checkout body: {exc}") from None
    if not 1 <= body.qty <= 10 or not 1 <= body.product_id <= PRODUCTS:
        raise web.HTTPBadRequest(reason="unknown product or qty outside 1..10")
    return web.json_response(await request.app[SHOP_KEY].checkout(body.product_id, body.qty))


async def health(request: web.Request) -> web.Response:
    shop = request.app[SHOP_KEY]
    return web.json_response({"status": "ok", "uptime_s": round(time.time() - shop.started_at, 1),
                              "config": shop.config.active.version})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[SHOP_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _dispatch(request: web.Request, name: str, params: msgspec.Struct) -> str:
    shop = request.app[SHOP_KEY]
    if isinstance(params, ScalePoolParams):
        return await shop.scale_pool(params.size)
    if isinstance(params, RollbackConfigParams):
        return await shop.rollback_config(params.version)
    remedy: Callable[[], Awaitable[str]] = getattr(shop, name)
    return await remedy()


action = action_route(ACTIONS, _dispatch, lambda request: request.app[SHOP_KEY].logs.log)


def make_app(shop: Shop) -> web.Application:
    app = web.Application(middlewares=[observe], client_max_size=MAX_ACTION_BODY)
    app[SHOP_KEY] = shop
    app.router.add_get("/products", listing)
    app.router.add_get("/products/{id}", product)
    app.router.add_get("/search", search)
    app.router.add_post("/checkout", checkout)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/actions/{name}", action)
    return app
