"""The ratelimiter's own settings: `[subjects.<name>.options]` in the menders config.

The kind defines and validates them (msgspec), so `SubjectConfig` stays generic:
it keeps an untyped `options` table and asks the kind to check it, and an error
names the bad key (`subjects.<name>.options.nodes`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from bus_schemas.errors import MendersError

MAX_NODES = 9
MAX_LIMIT = 1000  # requests per window: the bound the set_limit action enforces too
CLIENT_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"


class ClientOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)]  # allowed per window
    rps: Annotated[float, msgspec.Meta(ge=0, le=500)]  # offered by the load generator


def _default_clients() -> dict[str, ClientOptions]:
    # Two clients below their limit, two above it (one far above): a node that allows
    # everything shows as allowed/limit of about 2 on `scraper`.
    return {"web": ClientOptions(limit=40, rps=20), "mobile": ClientOptions(limit=30, rps=10),
            "batch": ClientOptions(limit=10, rps=20), "scraper": ClientOptions(limit=5, rps=30)}


class RatelimiterOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    nodes: Annotated[int, msgspec.Meta(ge=1, le=MAX_NODES)] = 3
    window_s: Annotated[float, msgspec.Meta(ge=0.5, le=60)] = 1.0
    clients: dict[str, ClientOptions] = msgspec.field(default_factory=_default_clients)
    load: bool = True  # run the built-in load generator
    redis_server: str = ""  # the redis-server binary; default: PATH

    def __post_init__(self) -> None:
        for name in self.clients:
            if not re.fullmatch(CLIENT_NAME, name):
                raise ValueError(f"clients: bad client name {name!r} (want {CLIENT_NAME})")
        if not self.clients:
            raise ValueError("clients: at least one client is needed")


class OptionsError(MendersError, ValueError):
    pass


def decode_options(raw: dict[str, Any] | None, where: str = "options") -> RatelimiterOptions:
    """Validate an options table; OptionsError names the key (`options.nodes`)."""
    try:
        return msgspec.convert(raw or {}, RatelimiterOptions)
    except msgspec.ValidationError as exc:
        text = str(exc).replace("`$", f"`{where}")
        if "`" not in text:
            text = f"{where}: {text}"
        raise OptionsError(text) from None
