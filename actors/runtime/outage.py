"""Riding through a broker outage: retried, never fatal, logged once until it recovers.

When nats-server goes away (killed, restarted by `menders up`, a network cut),
nats-py reconnects by itself (`max_reconnect_attempts=-1`) and KV watchers are
re-created (`kv.watch_forever`); what is left to us is what a loop or a
handler does with the errors in between: a request that timed out, "no
responders", a connection that is reconnecting or closed, JetStream answering
503 while it recovers its store. Those are an outage, not a bug: retry them,
never crash the process on them, and say so once per outage, not at every
attempt (twice a second is noise that hides the one line that matters).

- `is_outage(exc)`: whether an error means "the broker is not answering".
- `Outage(what)`: one activity's view of an outage. `failed(exc)` logs the
  first failure (warning) and counts the rest (debug); `recovered()` logs
  once, with how long and how many failures, when it works again.
  `with outage.guard(): ...` does both around one step of a loop, and
  `await outage.retry(op)` retries one call until it succeeds.
- `ride_through(what, loop_fn)`: wraps a background loop (an
  `Actor.background()` entry) so that an outage error re-runs it after a
  backoff instead of ending the process; any other error still ends it (let
  it crash). Re-running from the top must be safe, which is what a loop built
  to survive a process restart already is.

Handlers need nothing from here: the runtime naks a handler that raised, with
backoff, and the message comes back once the broker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import nats.errors
import nats.js.errors

from actors.runtime.logs import get_logger

log = get_logger("menders.outage")

T = TypeVar("T")

# What a broker that is down, restarting or recovering its store looks like to a client.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,  # a request (KV get, JetStream API, publish ack) unanswered
    nats.errors.NoRespondersError,  # JetStream not (yet) serving the stream
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,  # UnexpectedEOF too
    nats.errors.OutboundBufferLimitError,  # the reconnect buffer filled while down
    nats.errors.NoServersError,
    nats.js.errors.ServiceUnavailableError,  # 503: JetStream recovering after a restart
)

BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 5.0
HEALTHY_S = 5.0  # a re-run loop that ran this long without an outage error: recovered


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` (or every error of an exception group) means the broker is unavailable."""
    if isinstance(exc, BaseExceptionGroup):
        return bool(exc.exceptions) and all(is_outage(e) for e in exc.exceptions)
    if isinstance(exc, OUTAGE_ERRORS):
        return True
    return isinstance(exc, nats.js.errors.APIError) and getattr(exc, "code", None) == 503


class Outage:
    """Log once until it recovers: one activity's view of the broker being unavailable."""

    def __init__(self, what: str, logger: logging.Logger | None = None, *,
                 backoff_initial_s: float = BACKOFF_INITIAL_S,
                 backoff_max_s: float = BACKOFF_MAX_S) -> None:
        self.what = what
        self.log = logger or log
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.down_since: float | None = None
        self.failures = 0  # in the current outage
        self.outages = 0  # since this object was made

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, exc: BaseException) -> bool:
        """Record one failure; True (and a warning logged) only for an outage's first."""
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            self.log.warning("broker unavailable, retrying until it is back",
                             extra={"what": self.what, "err": _describe(exc)})
            return True
        self.log.debug("still unavailable", extra={"what": self.what, "err": _describe(exc),
                                                   "failures": self.failures})
        return False

    def recovered(self) -> bool:
        """Record a success; True (and one info line logged) if it ends an outage."""
        if self.down_since is None:
            return False
        self.log.info("broker available again", extra={
            "what": self.what, "failures": self.failures,
            "down_s": round(time.monotonic() - self.down_since, 2)})
        self.down_since = None
        self.failures = 0
        return True

    def backoff_s(self) -> float:
        """The pause before the next attempt: doubling per failure, capped."""
        if self.failures <= 0:
            return 0.0
        return min(self.backoff_initial_s * 2 ** (self.failures - 1), self.backoff_max_s)

    async def pause(self) -> None:
        await asyncio.sleep(self.backoff_s())

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around one step of a loop: an outage error is recorded and swallowed (the loop
        tries again next time round); a clean step ends the outage. Other errors pass."""
        try:
            yield
        except Exception as exc:
            if not is_outage(exc):
                raise
            self.failed(exc)
        else:
            self.recovered()

    async def retry(self, op: Callable[[], Awaitable[T]]) -> T:
        """Call `op` until it does not fail with an outage error, backing off between."""
        while True:
            try:
                result = await op()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                self.failed(exc)
                await self.pause()
                continue
            self.recovered()
            return result


def ride_through(what: str, loop_fn: Callable[[], Awaitable[None]], *,
                 logger: logging.Logger | None = None,
                 healthy_s: float = HEALTHY_S) -> Callable[[], Awaitable[None]]:
    """`loop_fn` as a background loop that an outage does not end.

    An outage error out of `loop_fn` is logged (once per outage) and `loop_fn`
    runs again from the top after a backoff; once a re-run has gone `healthy_s`
    without one, the outage is over (logged once). Any other error, and a
    normal return, end it as before.
    """

    async def run() -> None:
        outage = Outage(what, logger)
        while True:
            task = asyncio.ensure_future(loop_fn())
            try:
                if outage.down:
                    done, _ = await asyncio.wait({task}, timeout=healthy_s)
                    if not done:
                        outage.recovered()
                await task
                return
            except Exception as exc:
                if not is_outage(exc):
                    raise
                outage.failed(exc)
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await outage.pause()

    run.__name__ = getattr(loop_fn, "__name__", "loop")
    run.__qualname__ = f"ride_through({run.__name__})"
    return run


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
