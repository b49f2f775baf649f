"""Reading the kill switch before an effect: the flag and the governor's release, fresh.

Every process that decides whether something may *start* (the executor before
each step, the governor before each release, `menders status`) reads it here,
so they all agree (bus_schemas.governor.kill_state is the one rule).
"""

from __future__ import annotations

import asyncio
import time

from actors.runtime.kv import Bucket
from bus_schemas.governor import (
    KILL_KEY,
    RELEASE_KEY,
    KillFlag,
    Release,
    encode_kill,
    encode_release,
    kill_state,
)


async def read_kill(bucket: Bucket) -> KillFlag:
    """Two `get`s at once (never the watch: it may lag or have died); engaged unless
    released by the governor's resume at the flag's current revision. The flag and the
    record may be read in either order: a resume writes the flag first, so a record
    that is older than the flag reads as engaged, never the other way round."""
    flag, release = await asyncio.gather(bucket.get_entry(KILL_KEY),
                                         bucket.get_bytes(RELEASE_KEY))
    return kill_state(flag, release)


async def release(bucket: Bucket, by: str, reason: str) -> KillFlag:
    """The governor's resume: the released flag, then the record of its revision (until
    that record lands, readers still see engaged: the safe order)."""
    flag = KillFlag(engaged=False, by=by, reason=reason, at=time.time())
    await _record(bucket, flag, await bucket.put(KILL_KEY, encode_kill(flag)))
    return flag


async def initial_release(bucket: Bucket) -> bool:
    """Provisioning: a new install starts released, as if the governor had resumed (a
    missing flag reads as engaged). An existing flag is never touched."""
    flag = KillFlag(engaged=False, by="provisioning", reason="new install", at=time.time())
    rev = await bucket.create_bytes(KILL_KEY, encode_kill(flag))
    if rev is None:
        return False
    await _record(bucket, flag, rev)
    return True


async def _record(bucket: Bucket, flag: KillFlag, revision: int) -> None:
    await bucket.put(RELEASE_KEY, encode_release(Release(revision=revision, by=flag.by,
                                                         reason=flag.reason, at=flag.at)))
