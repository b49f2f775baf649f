"""The key schema in Redis, shared by the nodes, the manager, the observer and the oracle."""

from __future__ import annotations

from redis.asyncio import Redis

MAX_SCAN_KEYS = 1000  # window keys read per look: a bound on a flood of clients

PREFIX = "rl:"
WINDOW_PREFIX = "rl:w:"  # one sorted set per client: the sliding window log (score = ms)
LIMITS = "rl:limits"  # hash client -> allowed per window
TALLY = "rl:tally"  # hash client -> requests ever allowed (what Redis recorded)
GOOD_BUILD = "1.4.2"
BAD_BUILD = "1.5.0-rc1"  # its refactored check never denies
BUILDS = (GOOD_BUILD, BAD_BUILD)


def window_key(client: str) -> str:
    return f"{WINDOW_PREFIX}{client}"


def client_of(key: str) -> str:
    return key[len(WINDOW_PREFIX):]


def connection_name(node_id: str) -> str:
    """CLIENT SETNAME of a node's connections: how Redis's CLIENT LIST names them."""
    return f"rl-{node_id}"


def text(raw: bytes | str) -> str:
    """redis-py answers bytes unless decode_responses: one spelling for both."""
    return raw.decode() if isinstance(raw, bytes) else raw


async def window_counters(r: Redis, limit: int = MAX_SCAN_KEYS) -> dict[str, tuple[int, int]]:
    """Every window key (at most `limit`) -> (PTTL in ms, -1 without one; entries), in one
    SCAN and one pipelined round trip."""
    names: list[str] = []
    async for raw in r.scan_iter(match=f"{WINDOW_PREFIX}*", count=500):
        names.append(text(raw))
        if len(names) >= limit:
            break
    if not names:
        return {}
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.pttl(name)
        pipe.zcard(name)
    replies = await pipe.execute()
    return {n: (int(replies[2 * i]), int(replies[2 * i + 1])) for i, n in enumerate(names)}
