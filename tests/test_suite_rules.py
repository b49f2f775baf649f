"""The test suite's own rules: helpers are shared only through tests/harness.py, and
the e2e marker is derived and enforced (tests/conftest.py), so the unit run
(`-m "not e2e"`) can start no server and no process."""

from __future__ import annotations

import ast
import asyncio
import re
import socket
import subprocess
import sys

import pytest

from tests.conftest import E2E_FIXTURES
from tests.harness import REPO

TESTS = REPO / "tests"
SUPPORT = {"harness", "conftest", "fake_anthropic", "fixture_actor", "pgstack"}  # not test modules


def test_test_modules_import_no_other_test_module() -> None:
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "tests" and len(parts) > 1 and parts[1] not in SUPPORT:
                    offenders.append(f"{path.name}:{node.lineno} imports {name}")
    assert offenders == [], "share helpers through tests/harness.py:\n" + "\n".join(offenders)


def test_every_e2e_fixture_name_is_a_fixture_of_the_suite() -> None:
    """A renamed server fixture must not silently drop out of the marker's derivation."""
    sources = "\n".join(p.read_text() for p in TESTS.glob("*.py"))
    for name in E2E_FIXTURES:
        assert re.search(rf"@pytest\.fixture[^\n]*\n(async )?def {name}\(", sources), name


def test_every_test_that_uses_a_server_fixture_is_marked_e2e(
        request: pytest.FixtureRequest) -> None:
    for item in request.session.items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            assert item.get_closest_marker("e2e") is not None, item.nodeid


def test_a_unit_test_that_starts_a_process_fails_saying_to_mark_it() -> None:
    with pytest.raises(pytest.fail.Exception, match="started a process but is not marked e2e"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


async def test_a_unit_test_that_starts_an_asyncio_subprocess_fails_saying_to_mark_it() -> None:
    with pytest.raises(pytest.fail.Exception, match="started a process but is not marked e2e"):
        await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")


def test_a_unit_test_that_listens_on_a_socket_fails_saying_to_mark_it() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(pytest.fail.Exception, match=r"listened on a socket .* not marked e2e"):
            s.listen()


@pytest.mark.e2e
def test_an_e2e_test_may_start_a_process() -> None:
    assert subprocess.run([sys.executable, "-c", "pass"], check=True).returncode == 0
