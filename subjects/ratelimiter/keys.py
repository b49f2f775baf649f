"""The key schema in Redis, shared by the nodes, the manager and the observer."""

from __future__ import annotations

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
