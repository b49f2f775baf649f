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

import hashlib
import time
from typing import get_args

import msgspec

from bus_schemas.messages import Mode

MODE_KEY = "mode"
KILL_KEY = "kill"  # the one key the operator may write: engaging never waits for the governor
# Governor-only: the revision of the kill flag that its last `resume` wrote. A released
# flag at any other revision (an operator's put, a `kv del`) is no release at all.
RELEASE_KEY = "kill_release"
REVOKED_PREFIX = "revoked."  # revoked.<execution_id>
PENDING_PREFIX = "pending."  # pending.<execution_id>: a step waiting for a human

UNREADABLE_KILL = "unreadable kill flag"
MISSING_KILL = "no kill flag (missing or deleted)"
FORGED_RELEASE = "released without `menders resume` (not the governor's release)"

_MODES: frozenset[str] = frozenset(get_args(Mode))


class KillFlag(msgspec.Struct, kw_only=True):
    engaged: bool = False
    by: str = ""
    reason: str = ""
    at: float = 0.0


class Release(msgspec.Struct, kw_only=True):
    """What the governor's resume wrote: the kill flag's revision it released at."""

    revision: int
    by: str = ""
    reason: str = ""
    at: float = 0.0


class Pending(msgspec.Struct, kw_only=True):
    """A step waiting for `menders approve|deny` (the governor writes it; status reads it)."""

    execution_id: str
    plan_id: str
    step_id: str
    subject: str
    requested_at: float
    expires_at: float  # then the governor denies it
    incident_id: str = ""
    action: str = ""
    reason: str = ""  # why a human must decide
    # Set when a human, the timeout or a revocation settled it: its events are in the
    # plan's progress, and the key stays until they surely went out.
    settled_at: float = 0.0


class Revocation(msgspec.Struct, kw_only=True):
    execution_id: str
    by: str
    reason: str
    at: float = msgspec.field(default_factory=time.time)


_kill_decoder = msgspec.json.Decoder(KillFlag)
_revocation_decoder = msgspec.json.Decoder(Revocation)
_release_decoder = msgspec.json.Decoder(Release)
_encoder = msgspec.json.Encoder()


def revoked_key(execution_id: str) -> str:
    return REVOKED_PREFIX + execution_id


def plan_revoked_key(plan_id: str) -> str:
    """Where a revocation of a whole plan is recorded (plan ids may hold any character;
    the key takes a hash of it)."""
    return REVOKED_PREFIX + "plan-" + hashlib.blake2b(plan_id.encode(),
                                                      digest_size=16).hexdigest()


def parse_kill(raw: bytes | None) -> KillFlag:
    """The flag as written. Missing (never written, or deleted) and undecodable both
    count as engaged: fail closed. Provisioning writes the first, released, flag.

    This is what a watch can know; before anything *starts*, use `kill_state`, which
    also checks that a release is the governor's.
    """
    if raw is None:
        return KillFlag(engaged=True, reason=MISSING_KILL)
    try:
        return _kill_decoder.decode(raw)
    except msgspec.DecodeError:
        return KillFlag(engaged=True, reason=UNREADABLE_KILL)


def kill_state(flag: tuple[bytes, int] | None, release: bytes | None) -> KillFlag:
    """May anything start? `flag` is the kill key's (value, revision), `release` the
    RELEASE_KEY's value. Released only when the flag reads released *and* is the very
    revision the governor's resume recorded; anything else is engaged."""
    if flag is None:
        return parse_kill(None)
    parsed = parse_kill(flag[0])
    if parsed.engaged:
        return parsed
    rel = parse_release(release)
    if rel is None or rel.revision != flag[1]:
        return KillFlag(engaged=True, by=parsed.by, reason=FORGED_RELEASE, at=parsed.at)
    return parsed


def parse_release(raw: bytes | None) -> Release | None:
    if raw is None:
        return None
    try:
        return _release_decoder.decode(raw)
    except msgspec.DecodeError:
        return None


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


def encode_release(rel: Release) -> bytes:
    return _encoder.encode(rel)


def encode_mode(mode: Mode) -> bytes:
    return mode.encode()


def encode_revocation(rev: Revocation) -> bytes:
    return _encoder.encode(rev)
