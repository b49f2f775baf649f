"""The cluster's own settings: `[subjects.<name>.options]` in the menders config.

Validated by the kind (subjects.validate_options), like the ratelimiter's.
"""

from __future__ import annotations

from typing import Annotated

import msgspec


class KvClusterOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Where cluster.json, the data dirs, pid files and member logs live (the embedded
    # subject: <home>/subjects/<name>); empty: three members from the url's base port.
    cluster_dir: str = ""
    loadgen_url: str = ""  # empty: the base port + 6
    load_rps: Annotated[float, msgspec.Meta(ge=0, le=500)] = 40.0
