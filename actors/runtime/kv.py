"""Typed access to JetStream KV: the one place that calls the nats KeyValue API.

`Bucket` is one bucket's raw bytes (the mode, existence checks, watches);
`Records[T]` is the typed record helper over it: one JSON Struct type per
instance, one Decoder built once, values returned with their revision so a
later write can be a compare-and-swap.

Writes that compare (`create`, `replace`) are retried on a timeout or "no
responders" (the first attempt's outcome is unknown, the CAS makes a retry
safe), and a conflict whose current value equals the one we wrote counts as
ours: that is a timed-out first attempt that landed. Plain reads and `put`s
are single attempts; their callers decide what a failure means.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from actors.runtime.logs import get_logger
from bus_schemas.errors import MendersError

log = get_logger("menders.kv")

T = TypeVar("T", bound=msgspec.Struct)

OnValue = Callable[[str, bytes | None], Awaitable[None]]

WRITE_ATTEMPTS = 5


class KvConflict(MendersError, RuntimeError):
    """Somebody else changed the key between our read and our write."""


class Unreadable(MendersError, msgspec.DecodeError):
    """A stored value that does not decode as its record type.

    A DecodeError, so callers that let one propagate behave as before; it
    carries the revision for callers that start over and overwrite it.
    """

    def __init__(self, key: str, revision: int, err: msgspec.DecodeError) -> None:
        super().__init__(f"{key}: {err}")
        self.key = key
        self.revision = revision


@dataclass(frozen=True)
class Record(Generic[T]):
    value: T
    revision: int


class Bucket:
    """One KV bucket, raw bytes in and out."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get_entry(self, key: str) -> tuple[bytes, int] | None:
        """(value, revision), or None if the key is missing or deleted."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:  # KeyDeletedError too: nats-py maps it
            return None
        return entry.value or b"", entry.revision or 0

    async def get_bytes(self, key: str) -> bytes | None:
        got = await self.get_entry(key)
        return None if got is None else got[0]

    async def create_bytes(self, key: str, value: bytes) -> int | None:
        """Create the key; its revision, or None if it exists already."""
        try:
            return await _retrying(lambda: self.kv.create(key, value))
        except KeyWrongLastSequenceError:
            return None

    async def update_bytes(self, key: str, value: bytes, revision: int) -> int:
        """Compare-and-swap on `revision`; KvConflict if the key moved."""
        try:
            return await _retrying(lambda: self.kv.update(key, value, last=revision))
        except KeyWrongLastSequenceError:
            raise KvConflict(f"{key} changed since revision {revision}") from None

    async def put(self, key: str, value: bytes) -> int:
        return int(await self.kv.put(key, value))

    async def delete(self, key: str, last: int | None = None) -> None:
        """Delete the key (only at revision `last`, if given: KvConflict if it moved)."""
        try:
            await self.kv.delete(key, last=last)
        except KeyNotFoundError:  # already gone is fine
            pass
        except KeyWrongLastSequenceError:
            raise KvConflict(f"{key} changed since revision {last}") from None

    async def keys(self, prefix: str) -> list[str]:
        """Keys under `prefix`, which ends with "." (a key-token boundary).

        A watch on `<prefix>>`, so the server sends only those keys (nats-py's own
        `keys(filters=...)` reads every key of the bucket, filters by substring, and
        logs a warning each time).
        """
        if not prefix.endswith("."):
            raise ValueError(f"a key prefix ends with '.', not {prefix!r}")
        watcher = await self.kv.watch(prefix + ">", ignore_deletes=True, meta_only=True)
        found: list[str] = []
        try:
            async for entry in watcher:
                if entry is None:  # caught up
                    break
                found.append(entry.key)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return found


class Records(Generic[T]):
    """Records of one Struct type in a bucket (which may hold other types under other keys)."""

    def __init__(self, bucket: Bucket | KeyValue, type_: type[T]) -> None:
        self.bucket = bucket if isinstance(bucket, Bucket) else Bucket(bucket)
        self._decoder = msgspec.json.Decoder(type_)
        self._encoder = msgspec.json.Encoder()

    async def get(self, key: str) -> Record[T] | None:
        """The record, or None if missing; Unreadable if it does not decode."""
        got = await self.bucket.get_entry(key)
        if got is None:
            return None
        raw, revision = got
        try:
            return Record(self._decoder.decode(raw), revision)
        except msgspec.DecodeError as exc:
            raise Unreadable(key, revision, exc) from None

    async def create(self, key: str, value: T) -> Record[T] | None:
        """Create the key; None if it exists with another value."""
        rev = await self.bucket.create_bytes(key, self._encoder.encode(value))
        if rev is not None:
            return Record(value, rev)
        now = await self.get(key)  # ours if a timed-out first attempt landed
        return now if now is not None and now.value == value else None

    async def replace(self, key: str, last: Record[T] | int, value: T) -> Record[T]:
        """Compare-and-swap on the revision we hold; KvConflict if it moved."""
        revision = last if isinstance(last, int) else last.revision
        try:
            rev = await self.bucket.update_bytes(key, self._encoder.encode(value), revision)
        except KvConflict:
            now = await self.get(key)  # ours if a timed-out first attempt landed
            if now is not None and now.value == value:
                return now
            raise
        return Record(value, rev)

    async def save(self, key: str, value: T, revision: int | None) -> Record[T]:
        """Create (revision None) or compare-and-swap; KvConflict if somebody got there first."""
        if revision is None:
            rec = await self.create(key, value)
            if rec is None:
                raise KvConflict(f"{key} was created by somebody else")
            return rec
        return await self.replace(key, revision, value)

    async def put(self, key: str, value: T) -> int:
        """Unconditional write, for values with one writer (or where the last one wins)."""
        return await self.bucket.put(key, self._encoder.encode(value))


async def watch_forever(nc: Client, bucket: Bucket, keys: str, on_value: OnValue,
                        idle_s: float = 1.0) -> None:
    """A KV watch that survives server restarts and reconnects.

    nats.py watchers have been seen to stop after a server restart (issue 510),
    so the watcher is re-created after every reconnect and every error. The
    first delivery of each key replays its current value. Deleted keys give None.
    """
    while True:
        try:
            watcher = await bucket.kv.watch(keys)
        except Exception as exc:
            log.warning("kv watch failed, retrying", extra={"keys": keys, "err": repr(exc)})
            await asyncio.sleep(0.5)
            continue
        reconnects = nc.stats["reconnects"]
        try:
            while nc.stats["reconnects"] == reconnects:
                try:
                    entry = await watcher.updates(timeout=idle_s)
                except nats.errors.TimeoutError:
                    continue
                if entry is None:  # "caught up" marker
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                await on_value(entry.key, None if deleted else entry.value)
        except Exception as exc:
            log.warning("kv watch broke, re-creating", extra={"keys": keys, "err": repr(exc)})
            await asyncio.sleep(0.2)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()


async def _retrying(op: Callable[[], Awaitable[int]], attempts: int = WRITE_ATTEMPTS) -> int:
    """Retry a KV write whose outcome is unknown (timeout): the CAS makes it safe."""
    delay = 0.1
    for attempt in range(attempts):
        try:
            return int(await op())
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
