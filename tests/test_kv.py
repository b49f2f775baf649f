"""The typed KV helper (actors/runtime/kv.py) against a real nats-server, and the
governor's value parsers (bus_schemas/governor.py), which are pure."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import pytest

from actors.runtime.kv import Bucket, KvConflict, Records, Unreadable, watch_forever
from bus_schemas import catalog
from bus_schemas.governor import (
    MISSING_KILL,
    UNREADABLE_KILL,
    KillFlag,
    Release,
    Revocation,
    encode_kill,
    encode_mode,
    encode_release,
    encode_revocation,
    kill_state,
    parse_kill,
    parse_mode,
    parse_revocation,
)
from tests.harness import Bus

e2e = pytest.mark.e2e


class Tally(msgspec.Struct, kw_only=True):
    n: int = 0
    by: list[str] = []


async def _records(bus: Bus) -> Records[Tally]:
    nc = await bus.connect(catalog.ADMIN)
    return Records(await nc.jetstream(timeout=5).key_value(catalog.PLANNER_BUCKET), Tally)


# --- the helper, on a real server -----------------------------------------------------


@e2e
async def test_a_missing_key_reads_as_none(bus: Bus) -> None:
    tallies = await _records(bus)
    assert await tallies.get("nope") is None
    assert await tallies.bucket.get_bytes("nope") is None


@e2e
async def test_create_twice_the_second_gets_none_unless_it_is_the_same_value(bus: Bus) -> None:
    tallies = await _records(bus)
    first = await tallies.create("t", Tally(n=1, by=["a"]))
    assert first is not None and first.revision > 0
    assert await tallies.create("t", Tally(n=1, by=["b"])) is None
    # An equal value already there is ours: what a timed-out first attempt that landed leaves.
    assert await tallies.create("t", Tally(n=1, by=["a"])) == first
    assert await tallies.get("t") == first


@e2e
async def test_a_stale_revision_is_a_conflict(bus: Bus) -> None:
    tallies = await _records(bus)
    first = await tallies.create("t", Tally(n=1))
    assert first is not None
    second = await tallies.replace("t", first, Tally(n=2))
    assert second.revision > first.revision
    with pytest.raises(KvConflict):
        await tallies.replace("t", first, Tally(n=3))
    with pytest.raises(KvConflict):
        await tallies.replace("t", first.revision, Tally(n=3))
    with pytest.raises(KvConflict):  # save(revision=None) means "create": the key exists
        await tallies.save("t", Tally(n=3), None)
    assert await tallies.get("t") == second
    third = await tallies.save("t", Tally(n=3), second.revision)
    assert (await tallies.get("t")) == third and third.value.n == 3


@e2e
async def test_a_deleted_key_reads_as_missing_and_can_be_created_again(bus: Bus) -> None:
    tallies = await _records(bus)
    assert await tallies.create("t", Tally(n=1)) is not None
    await tallies.bucket.delete("t")
    await tallies.bucket.delete("t")  # already gone is fine
    assert await tallies.get("t") is None
    again = await tallies.create("t", Tally(n=2))
    assert again is not None and await tallies.get("t") == again


@e2e
async def test_an_undecodable_value_is_unreadable_with_its_revision(bus: Bus) -> None:
    tallies = await _records(bus)
    rev = await tallies.bucket.put("t", b"not json")
    with pytest.raises(Unreadable) as err:
        await tallies.get("t")
    assert err.value.revision == rev and isinstance(err.value, msgspec.DecodeError)
    # A caller that starts over overwrites it with a CAS on that revision.
    fresh = await tallies.save("t", Tally(), err.value.revision)
    assert await tallies.get("t") == fresh


@e2e
async def test_keys_lists_one_prefix(bus: Bus) -> None:
    tallies = await _records(bus)
    assert await tallies.bucket.keys("pending.") == []
    for key in ("pending.a", "pending.b", "plan.pending.c"):
        await tallies.put(key, Tally())
    assert sorted(await tallies.bucket.keys("pending.")) == ["pending.a", "pending.b"]


@e2e
async def test_watch_forever_sees_the_current_value_then_puts_and_deletes(bus: Bus) -> None:
    nc = await bus.connect(catalog.ADMIN)
    bucket = Bucket(await nc.jetstream(timeout=5).key_value(catalog.GOVERNOR_BUCKET))
    await bucket.put("kill", b"first")
    seen: list[tuple[str, bytes | None]] = []
    arrived = asyncio.Event()

    async def on_value(key: str, value: bytes | None) -> None:
        seen.append((key, value))
        arrived.set()

    async def until(n: int) -> None:
        while len(seen) < n:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 10)

    task = asyncio.create_task(watch_forever(nc, bucket, "kill", on_value))
    try:
        await until(1)  # the current value is replayed first
        await bucket.put("kill", b"second")
        await until(2)
        await bucket.delete("kill")
        await until(3)
        await bucket.put("mode", b"execute")  # another key: not ours
        await bucket.put("kill", b"third")
        await until(4)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert seen == [("kill", b"first"), ("kill", b"second"), ("kill", None), ("kill", b"third")]


# --- the governor's values: pure parsers --------------------------------------------


def test_a_missing_kill_flag_is_engaged() -> None:
    assert parse_kill(None) == KillFlag(engaged=True, reason=MISSING_KILL)


def test_only_the_governors_release_at_the_flags_revision_releases() -> None:
    released = encode_kill(KillFlag(engaged=False, by="ana", at=5.0))
    ours = encode_release(Release(revision=7, by="ana"))
    assert not kill_state((released, 7), ours).engaged
    for flag, release in [((released, 8), ours),  # an operator's put after the resume
                          ((released, 7), None),  # no release recorded
                          ((released, 7), b"junk"),
                          (None, ours)]:  # `kv del kill`
        assert kill_state(flag, release).engaged, (flag, release)
    engaged = encode_kill(KillFlag(engaged=True, by="ops", reason="drill", at=1.0))
    assert kill_state((engaged, 7), ours) == KillFlag(engaged=True, by="ops", reason="drill",
                                                      at=1.0)


def test_a_valid_kill_flag_reads_as_written() -> None:
    flag = KillFlag(engaged=True, by="ops", reason="drill", at=12.5)
    assert parse_kill(encode_kill(flag)) == flag
    released = KillFlag(engaged=False, by="ops", reason="done", at=13.0)
    assert parse_kill(encode_kill(released)) == released
    assert parse_kill(b'{"engaged": false}') == KillFlag()  # spacing is not meaning


@pytest.mark.parametrize("raw", [
    b"", b"garbage", b"{", b"\xff\xfe", b"null", b"[]", b"true", b'"engaged"',
    b'{"engaged": "false"}', b'{"engaged": 0}', b'{"engaged": false, "at": "noon"}',
])
def test_an_unreadable_kill_flag_is_engaged(raw: bytes) -> None:
    flag = parse_kill(raw)
    assert flag.engaged and flag.reason == UNREADABLE_KILL


def test_every_mode_round_trips_and_a_missing_mode_is_unset() -> None:
    for mode in ("observe", "approve", "execute"):
        assert parse_mode(encode_mode(mode)) == mode  # type: ignore[arg-type]
    assert parse_mode(None) is None


@pytest.mark.parametrize("raw", [b"", b"EXECUTE", b"execute ", b'"execute"', b"yolo",
                                 b"\xff\xfe"])
def test_an_unreadable_mode_is_unset(raw: bytes) -> None:
    assert parse_mode(raw) is None


def test_revocations_parse_or_read_as_none() -> None:
    rev = Revocation(execution_id="e1", by="ops", reason="wrong host", at=1.0)
    assert parse_revocation(encode_revocation(rev)) == rev
    assert parse_revocation(b"garbage") is None
    assert parse_revocation(b'{"execution_id": 1}') is None
