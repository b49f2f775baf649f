"""Shared fixtures, and the `e2e` marker: derived from what a test uses, then enforced.

A test is e2e when it starts a server (nats-server, the webshop, an HTTP
server, Prometheus) or a process; `python -m pytest -m "not e2e"` is the fast
unit run, everything else stays in the whole run.

- Derived: a test that uses a fixture named in E2E_FIXTURES, directly or
  through another fixture, is marked e2e at collection. A module whose tests
  start servers or processes without such a fixture says
  `pytestmark = pytest.mark.e2e`, a single test `@pytest.mark.e2e`.
- Enforced: while a test without the marker is set up and run, starting a
  process (subprocess.Popen, which asyncio's subprocesses use too, os.fork,
  os.posix_spawn, os.system) or listening on a socket fails it with a message
  saying how to mark it. A new server-starting test cannot land in the unit
  run unnoticed.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Bus, RecordingServer, recording_server, start_bus

# Fixtures that start a server or a process: whoever uses one is an e2e test.
E2E_FIXTURES = frozenset({
    "bus",  # a provisioned nats-server (below)
    "actions",  # the recording HTTP action server (below)
    "cluster",  # a 3-node nats-server cluster (test_cluster.py)
    "up",  # `menders up` as a process (test_supervisor.py)
    "shop",  # the webshop service as a process (test_webshop.py)
})


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[Bus]:
    """A real, provisioned nats-server for this test, stopped afterwards."""
    b = await start_bus(tmp_path)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def actions() -> AsyncIterator[RecordingServer]:
    """An HTTP action server that records every call (see harness.RecordingServer)."""
    async with recording_server() as server:
        yield server


def pytest_sessionstart(session: pytest.Session) -> None:
    # matplotlib builds its font cache on first use by running fc-list: do
    # that once here, before the guard below, so the report's unit tests do
    # not fail on a machine that has never drawn a plot (a fresh CI runner).
    import matplotlib.font_manager  # noqa: F401


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses = E2E_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if uses and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)


def _refuse(nodeid: str, what: str) -> Callable[..., Any]:
    def refused(*_args: Any, **_kwargs: Any) -> Any:
        pytest.fail(
            f"{nodeid} {what} but is not marked e2e. Mark the test `@pytest.mark.e2e` "
            "(the module: `pytestmark = pytest.mark.e2e`), or, if a fixture starts it, "
            "add the fixture's name to E2E_FIXTURES in tests/conftest.py.", pytrace=False)
    return refused


@contextmanager
def _no_servers_or_processes(nodeid: str) -> Iterator[None]:
    refuse_process = _refuse(nodeid, "started a process")

    class RefusedPopen(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            refuse_process(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", RefusedPopen)
        for name in ("fork", "posix_spawn", "posix_spawnp", "system"):
            if hasattr(os, name):
                mp.setattr(os, name, refuse_process)
        mp.setattr(socket.socket, "listen", _refuse(nodeid, "listened on a socket (a server)"))
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("e2e") is not None:
        yield
        return
    with _no_servers_or_processes(item.nodeid):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("e2e") is not None:
        yield
        return
    with _no_servers_or_processes(item.nodeid):
        yield
