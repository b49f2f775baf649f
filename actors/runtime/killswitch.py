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
    rev = await bucket.put(KILL_KEY, encode_kill(flag))
    await bucket.put(RELEASE_KEY, encode_release(Release(revision=rev, by=by, reason=reason,
                                                         at=flag.at)))
    return flag
