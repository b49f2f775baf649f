"""The pieces that let the stack outlive its broker, each on its own: what counts as an
outage, logging it once until it recovers, a background loop that rides through a
real nats-server going away and coming back, and the embedded server reaped at once
and restarted on the same port with its JetStream state."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
from nats.js.errors import KeyNotFoundError

from actors.runtime import credentials
from actors.runtime.kv import Bucket, KvConflict
from actors.runtime.outage import Outage, is_outage, ride_through
from actors.stack import provision
from actors.stack.natsserver import EmbeddedNats
from bus_schemas import catalog
from tests.harness import require_nats_server

LOGGER = "test.outage"


def test_what_counts_as_an_outage() -> None:
    outage = [nats.errors.TimeoutError(), nats.errors.NoRespondersError(),
              nats.errors.ConnectionClosedError(), nats.errors.ConnectionReconnectingError(),
              nats.errors.UnexpectedEOF(), nats.errors.OutboundBufferLimitError(),
              nats.js.errors.ServiceUnavailableError(code=503, description="recovering"),
              nats.js.errors.APIError(code=503, description="JetStream temporarily unavailable"),
              ExceptionGroup("both", [nats.errors.TimeoutError(),
                                      nats.errors.NoRespondersError()])]
    bugs = [ValueError("bad"), KeyError("k"), KvConflict("moved"), KeyNotFoundError(),
            nats.js.errors.APIError(code=400, description="bad request"),
            ExceptionGroup("mixed", [nats.errors.TimeoutError(), ValueError("bad")])]
    assert all(is_outage(e) for e in outage), [e for e in outage if not is_outage(e)]
    assert not any(is_outage(e) for e in bugs), [e for e in bugs if is_outage(e)]


def test_an_outage_is_logged_once_until_it_recovers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    outage = Outage("the loop", logging.getLogger(LOGGER))
    with outage.guard():
        pass
    assert not caplog.records  # nothing to say while all is well
    for _ in range(50):
        with outage.guard():
            raise nats.errors.TimeoutError
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith("broker unavailable")
    assert outage.down and outage.failures == 50
    assert outage.backoff_s() == outage.backoff_max_s  # doubled per failure, capped
    with outage.guard():
        pass
    back = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(back) == 1 and back[0].failures == 50  # type: ignore[attr-defined]
    assert not outage.down and outage.backoff_s() == 0
    with outage.guard():
        pass
    assert len([r for r in caplog.records if r.levelno == logging.INFO]) == 1
    # A bug is not an outage: it passes through.
    with pytest.raises(ValueError), outage.guard():
        raise ValueError("a bug")
    assert not outage.down


async def test_retry_retries_only_outage_errors() -> None:
    outage = Outage("one call", logging.getLogger(LOGGER), backoff_initial_s=0.01)
    calls = 0

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise nats.errors.NoRespondersError
        return calls

    assert await outage.retry(flaky) == 4
    assert outage.outages == 1 and not outage.down

    async def buggy() -> int:
        raise KvConflict("moved")

    with pytest.raises(KvConflict):
        await outage.retry(buggy)


async def test_a_loop_that_fails_for_a_bug_still_ends() -> None:
    async def loop() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await asyncio.wait_for(ride_through("buggy", loop)(), 5)


def _exists(pid: int) -> bool:
    """Whether any process (a zombie too) still has this PID."""
    return Path(f"/proc/{pid}").exists()


async def _server(tmp: Path) -> tuple[EmbeddedNats, dict[str, str]]:
    require_nats_server()
    passwords = credentials.generate()
    server = EmbeddedNats(tmp / "nats", passwords)
    await server.start()
    return server, passwords


async def _until(what: str, check: object, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


@pytest.mark.e2e
async def test_a_background_loop_rides_through_a_real_broker_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    server, passwords = await _server(tmp_path)
    nc = await nats.connect(server.url, user=catalog.ADMIN, password=passwords[catalog.ADMIN],
                            max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        js = nc.jetstream(timeout=0.5)
        await provision.provision(nc.jetstream(timeout=10))
        bucket = Bucket(await js.key_value(catalog.PLANNER_BUCKET))
        await bucket.put("probe", b"kept")
        reads: list[bytes | None] = []

        async def loop() -> None:  # like the planner's grace loop: KV every tick, no try
            while True:
                reads.append(await bucket.get_bytes("probe"))
                await asyncio.sleep(0.05)

        task = asyncio.ensure_future(
            ride_through("probe loop", loop, logger=logging.getLogger(LOGGER), healthy_s=1.0)())
        await _until("the loop reading", lambda: len(reads) >= 3)
        os.kill(server.pid or 0, signal.SIGKILL)
        code = await asyncio.wait_for(server.wait_exit(), 5)
        assert code == -signal.SIGKILL
        await _until("the outage logged", lambda: any(
            r.getMessage().startswith("broker unavailable") for r in caplog.records))
        await asyncio.sleep(1.5)  # the broker stays down: several attempts fail meanwhile
        assert not task.done(), task
        before = len(reads)
        await server.restart()
        await _until("reads again", lambda: len(reads) > before + 3)
        await _until("the recovery logged", lambda: any(
            r.getMessage() == "broker available again" for r in caplog.records))
        assert not task.done()
        assert reads[-1] == b"kept"  # file-backed KV: the value survived the SIGKILL
        outs = [r for r in caplog.records if r.getMessage().startswith("broker unavailable")]
        assert len(outs) == 1, [r.getMessage() for r in caplog.records]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await nc.close()
        server.stop()


@pytest.mark.e2e
async def test_the_embedded_server_is_reaped_at_once_and_restarts_on_its_port(
        tmp_path: Path) -> None:
    server, _ = await _server(tmp_path)
    try:
        old, url = server.pid, server.url
        assert old is not None
        waiter = asyncio.ensure_future(server.wait_exit())
        await asyncio.sleep(0.1)
        assert not waiter.done()  # it waits on the process, not on a timer
        os.kill(old, signal.SIGKILL)
        assert await asyncio.wait_for(waiter, 5) == -signal.SIGKILL
        assert not _exists(old)  # reaped: no zombie
        await server.restart()
        assert server.pid != old and server.url == url
        with pytest.raises(Exception, match="still running"):
            await server.restart()
    finally:
        server.stop()
