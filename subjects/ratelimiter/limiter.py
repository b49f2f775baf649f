"""The sliding-window decision: one Lua script, atomic in Redis, and the in-memory fallback.

Each client has a sorted set of the requests it was allowed in the last window
(score = time in ms). The script trims what fell out of the window, counts the
rest and, below the limit, records the request, refreshes the key's TTL and
adds one to the client's tally. `enforce = 0` is the bad build: it records
every request and allows it.
"""

from __future__ import annotations

import collections
import time

SCRIPT = """
local limit = tonumber(redis.call('HGET', KEYS[2], ARGV[4]) or '0')
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
if used < limit or ARGV[5] == '0' then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
  return {1, used + 1, limit}
end
return {0, used, limit}
"""


class LocalWindow:
    """Store `local`: per-client windows in process memory (meant for a laptop, not a fleet)."""

    def __init__(self) -> None:
        self.hits: dict[str, collections.deque[float]] = {}

    def decide(self, client: str, limit: float, window_s: float) -> bool:
        now = time.monotonic()
        hits = self.hits.setdefault(client, collections.deque())
        while hits and hits[0] <= now - window_s:
            hits.popleft()
        if len(hits) < limit:
            hits.append(now)
            return True
        return False
