"""The webshop's registered remediation actions and their typed parameters."""

from __future__ import annotations

from typing import Annotated

import msgspec

from subjects.base import ActionSpec, NoParams, RetryPolicy

MIN_POOL_SIZE = 1
MAX_POOL_SIZE = 64


class ScalePoolParams(msgspec.Struct, forbid_unknown_fields=True):
    # Bounded in the schema itself, so no proposal (an LLM's included) can ask for more.
    size: Annotated[int, msgspec.Meta(ge=MIN_POOL_SIZE, le=MAX_POOL_SIZE)]


class RollbackConfigParams(msgspec.Struct, forbid_unknown_fields=True):
    version: str = "last_good"


CONFIG_VERSIONS = ("last_good", "v1", "v2")

ACTIONS: dict[str, ActionSpec] = {
    spec.name: spec
    for spec in (
        ActionSpec(
            "recycle_pool",
            "Close every database connection (leaked ones included) and open a fresh pool.",
            NoParams, risk="low", idempotent=True, timeout_s=5.0,
        ),
        ActionSpec(
            "scale_pool",
            f"Resize the database connection pool to `size` ({MIN_POOL_SIZE}..{MAX_POOL_SIZE}).",
            ScalePoolParams, risk="medium", idempotent=True, timeout_s=5.0,
        ),
        ActionSpec(
            "failover_dependency",
            "Switch catalog reads and writes to the other (healthy) database replica.",
            NoParams, risk="low", idempotent=True, timeout_s=5.0,
        ),
        ActionSpec(
            "rollback_config",
            "Deploy a known config version (`last_good` by default).",
            RollbackConfigParams, risk="medium", idempotent=True, timeout_s=5.0,
        ),
        ActionSpec(
            "restart_worker",
            "Restart the worker: frees its memory, drops in-flight requests, rewarms the cache.",
            NoParams, risk="medium", idempotent=False, timeout_s=10.0, disruptive=True,
        ),
        ActionSpec(
            "enable_cache",
            "Enable the product cache and warm it.",
            NoParams, risk="low", idempotent=True, timeout_s=5.0,
            # Warming reads the catalog: a busy database fails it now and then.
            retry=RetryPolicy(attempts=3, backoff_s=0.2, backoff_max_s=1.0),
        ),
        ActionSpec(
            "rotate_logs",
            "Rotate the log directory: delete old and runaway log files, stop runaway writers.",
            NoParams, risk="low", idempotent=True, timeout_s=10.0,
        ),
    )
}
