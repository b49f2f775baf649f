"""The governor's KV bucket as a contract: the shared keys, their values, one parser each.

The governor writes the mode and revocations; the operator may also write the
kill flag directly, so that a kill never depends on the governor being up.
Executors watch the bucket and re-read it (a `get`, not only the watch) just
before every effect. Everyone who reads a value reads it through the parser
here, so "missing" and "unreadable" mean the same thing in every process:
fail closed, an unreadable kill flag is engaged and an unreadable mode is
unset (which every caller treats as the safer value).

The parsers are pure (bytes in, value out): actors/runtime/kv.py does the I/O.
"""

from __future__ import annotations

import time
from typing import get_args

import msgspec

from bus_schemas.messages import Mode

MODE_KEY = "mode"
KILL_KEY = "kill"
REVOKED_PREFIX = "revoked."  # revoked.<execution_id>

UNREADABLE_KILL = "unreadable kill flag"

_MODES: frozenset[str] = frozenset(get_args(Mode))


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


_kill_decoder = msgspec.json.Decoder(KillFlag)
_revocation_decoder = msgspec.json.Decoder(Revocation)
_encoder = msgspec.json.Encoder()


def revoked_key(execution_id: str) -> str:
    return REVOKED_PREFIX + execution_id


def parse_kill(raw: bytes | None) -> KillFlag:
    """None (no flag) is released; anything undecodable counts as engaged (fail closed)."""
    if raw is None:
        return KillFlag()
    try:
        return _kill_decoder.decode(raw)
    except msgspec.DecodeError:
        return KillFlag(engaged=True, reason=UNREADABLE_KILL)


def parse_mode(raw: bytes | None) -> Mode | None:
    """The mode, or None when unset or unreadable: callers then take the safer value."""
    if raw is None:
        return None
    try:
        value = raw.decode()
    except UnicodeDecodeError:
        return None
    return value if value in _MODES else None  # type: ignore[return-value]


def parse_revocation(raw: bytes) -> Revocation | None:
    """Who revoked and why, or None if unreadable: the key's existence alone revokes."""
    try:
        return _revocation_decoder.decode(raw)
    except msgspec.DecodeError:
        return None


def encode_kill(flag: KillFlag) -> bytes:
    return _encoder.encode(flag)


def encode_mode(mode: Mode) -> bytes:
    return mode.encode()


def encode_revocation(rev: Revocation) -> bytes:
    return _encoder.encode(rev)
