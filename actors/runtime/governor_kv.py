"""The governor's state in its KV bucket: the keys, their values, how to read them.

The governor writes mode and revocations; the operator may also write the
kill flag directly, so that a kill never depends on the governor being up.
Executors watch the bucket and re-read it (a `get`, not only the watch)
just before every effect.
"""

from __future__ import annotations

import time

import msgspec
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from bus_schemas.messages import Mode

MODE_KEY = "mode"
KILL_KEY = "kill"
REVOKED_PREFIX = "revoked."  # revoked.<execution_id>


class KillFlag(msgspec.Struct, kw_only=True):
    engaged: bool = False
    by: str = ""
    reason: str = ""
    at: float = 0.0


class Revocation(msgspec.Struct, kw_only=True):
    execution_id: str
    by: str
    reason: str
    at: float = msgspec.field(default_factory=time.time)


def revoked_key(execution_id: str) -> str:
    return REVOKED_PREFIX + execution_id


async def read_mode(kv: KeyValue) -> Mode | None:
    try:
        entry = await kv.get(MODE_KEY)
    except KeyNotFoundError:
        return None
    value = (entry.value or b"").decode()
    return value if value in ("observe", "approve", "execute") else None  # type: ignore[return-value]


async def read_kill(kv: KeyValue) -> KillFlag:
    """A missing flag is released; an unreadable one counts as engaged (fail closed)."""
    try:
        entry = await kv.get(KILL_KEY)
    except KeyNotFoundError:
        return KillFlag()
    try:
        return msgspec.json.decode(entry.value or b"", type=KillFlag)
    except msgspec.DecodeError:
        return KillFlag(engaged=True, reason="unreadable kill flag")


async def is_revoked(kv: KeyValue, execution_id: str) -> bool:
    try:
        await kv.get(revoked_key(execution_id))
    except KeyNotFoundError:
        return False
    return True
