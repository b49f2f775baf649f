"""The chaos HTTP protocol, the service's side: how a demo, a bench or a test breaks a subject.

A subject's chaos port (loopback only, in no config an actor reads) serves
`GET /faults` -> `{"faults": [every name], "active": {...}}`, `POST /faults/<name>`
to inject and `DELETE /faults/<name>` to clear -> `{"ok": true, "fault": name}`
(plus the active faults, where the subject says so), and, where the subject can
return to its healthy baseline, `POST /reset` -> `{"ok": true}`. An unknown fault
is a 404 whose text names the known ones. Every subject with a chaos object
serves it through `chaos_app` here; the callers (`menders demo`, the bench, the
tests) speak plain HTTP to it.

`GET /oracle` (`add_oracle`) is the eval's independent judge: `{"healthy": bool,
"failing": [reason, ...], "degraded": [reason, ...], "effects": {action: count}}`
(healthy is `failing == []`; degraded never fails it), from the subject's own
internals (never the metrics the crew's observer reads) and from the actions the
subject itself carried out since it started. It always answers, within about
ORACLE_BUDGET_S: a check that cannot be made is a failing reason, never an error.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

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


# --- GET /oracle -------------------------------------------------------------------------

ORACLE_BUDGET_S = 1.0  # per check; they run concurrently, so the endpoint answers in ~1 s
ACTION_RECORD = "action"  # the msg actionhttp.action_route logs once per action it ran

Check = Callable[[], Awaitable[list[str]]]  # the reasons it finds the subject failing


class _ActionLog(Protocol):
    def write(self, level: str, msg: str, **fields: Any) -> None: ...


class ActionTally:
    """The actions the subject carried out, counted at the subject's own action log."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        # Every known action from the start, at 0: a reader diffs two readings key by key.
        self.counts: collections.Counter[str] = collections.Counter(dict.fromkeys(known, 0))

    def tee(self, log: _ActionLog) -> None:
        """Count every "action" record `log` is given (action_route writes one per action
        that ran and succeeded; refusals are not logged, failures are "action failed").
        action_route's only output is that record, so the tally listens there."""
        inner = log.write

        def write(level: str, msg: str, **fields: Any) -> None:
            if msg == ACTION_RECORD:
                self.counts[str(fields.get("action", "?"))] += 1
            inner(level, msg, **fields)

        log.write = write  # type: ignore[method-assign]

    def effects(self) -> dict[str, int]:
        return dict(self.counts)


class Periodic:
    """Calls `tick` every `every_s` in a task of its own, from start() until stop(): an
    oracle's sampler that must see the subject between two readings."""

    def __init__(self, tick: Callable[[], None], every_s: float) -> None:
        self.tick, self.every_s = tick, every_s
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(self.every_s)

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


async def run_checks(checks: Mapping[str, Check], budget_s: float = ORACLE_BUDGET_S,
                     ) -> list[str]:
    """Every check at once, each cut off at `budget_s`: a check that times out or raises
    is itself a failing reason (the subject could not be shown healthy)."""

    async def one(name: str, check: Check) -> list[str]:
        try:
            return await asyncio.wait_for(check(), budget_s)
        except TimeoutError:
            return [f"{name}: no answer within {budget_s:g} s"]
        except Exception as exc:
            return [f"{name}: check failed: {type(exc).__name__}: {exc}"[:300]]

    found = await asyncio.gather(*(one(n, c) for n, c in checks.items()))
    return [reason for reasons in found for reason in reasons]


def add_oracle(app: web.Application, checks: Callable[[], Mapping[str, Check]],
               effects: Callable[[], Mapping[str, int]],
               degraded: Callable[[], Mapping[str, Check]] | None = None) -> None:
    """Serve `GET /oracle` on a chaos app: `checks()` names this moment's checks; the
    reasons of `degraded()` (lost redundancy the crew has no action to restore) are
    reported under "degraded" and leave the subject healthy."""

    async def oracle(_: web.Request) -> web.Response:
        failing, notes = await asyncio.gather(
            run_checks(checks()), run_checks(degraded() if degraded is not None else {}))
        return web.json_response({"healthy": not failing, "failing": failing,
                                  "degraded": notes, "effects": dict(effects())})

    app.router.add_get("/oracle", oracle)
