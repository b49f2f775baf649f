"""Reading the kill switch before an effect: the flag and the governor's release, fresh.

Every process that decides whether something may *start* (the executor before
each step, the governor before each release, `menders status`) reads it here,
so they all agree (bus_schemas.governor.kill_state is the one rule).
"""

from __future__ import annotations

from actors.runtime.kv import Bucket
from bus_schemas.governor import KILL_KEY, RELEASE_KEY, KillFlag, kill_state


async def read_kill(bucket: Bucket) -> KillFlag:
    """Two `get`s (never the watch: it may lag or have died); engaged unless released
    by the governor's resume at the flag's current revision."""
    flag = await bucket.get_entry(KILL_KEY)
    release = await bucket.get_bytes(RELEASE_KEY)
    return kill_state(flag, release)
