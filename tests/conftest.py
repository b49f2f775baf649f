from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Bus, start_bus


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[Bus]:
    """A real, provisioned nats-server for this test, stopped afterwards."""
    b = await start_bus(tmp_path)
    try:
        yield b
    finally:
        await b.close()
