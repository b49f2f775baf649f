"""The etcd cluster's SubjectDefinition: what actors know about it (never its chaos)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import msgspec

from subjects.base import SubjectDefinition
from subjects.kvcluster.actions import ACTIONS
from subjects.kvcluster.client import KvClusterActionClient
from subjects.kvcluster.invariants import INVARIANTS
from subjects.kvcluster.layout import LAYOUT_FILE, LOADGEN_PORT_OFFSET, Layout, from_base_port
from subjects.kvcluster.observer import KvClusterObserver
from subjects.kvcluster.options import KvClusterOptions
from subjects.kvcluster.runbooks import RUNBOOKS


def options_of(cfg: Any) -> KvClusterOptions:
    """The cluster's options from what the observer or the action client is built from:
    the monitor's Target carries the validated Struct, a SubjectConfig the raw table."""
    return msgspec.convert(getattr(cfg, "options", None) or {}, KvClusterOptions)


def cluster_dir_of(cfg: Any) -> Path | None:
    """Where cluster.json, the data dirs, pid files and member logs live: `cluster_dir`
    when the config says so, else the embedded subject's own state directory (the
    Target's `data_dir`, where `menders up` started it); None when neither is known."""
    explicit = options_of(cfg).cluster_dir
    if explicit:
        return Path(explicit)
    data_dir = getattr(cfg, "data_dir", None)
    return Path(data_dir) if data_dir else None


def layout_for(cfg: Any) -> Layout:
    """The members of a configured cluster: the cluster dir's cluster.json when it has one
    (the embedded subject writes it), else three members from the url's base port."""
    cluster_dir = cluster_dir_of(cfg)
    if cluster_dir is not None and (cluster_dir / LAYOUT_FILE).exists():
        return Layout.load(cluster_dir)
    parsed = urlparse(str(cfg.url))
    return from_base_port(cluster_dir or Path("."), parsed.port or 2379,
                          parsed.hostname or "127.0.0.1")


def loadgen_url_for(cfg: Any, layout: Layout) -> str:
    explicit = options_of(cfg).loadgen_url
    base = layout.members[0]
    return explicit or f"http://{base.host}:{base.client_port + LOADGEN_PORT_OFFSET}"


def make_observer(cfg: Any) -> KvClusterObserver:
    layout = layout_for(cfg)
    logs = {n: layout.log_file(n) for n in layout.names} if cluster_dir_of(cfg) else None
    return KvClusterObserver(layout.endpoints, loadgen_url_for(cfg, layout), logs)


def make_action_client(cfg: Any) -> KvClusterActionClient:
    return KvClusterActionClient(layout_for(cfg))


DEFINITION = SubjectDefinition(
    kind="kvcluster",
    description="A three-member etcd cluster (real etcd processes on loopback, an 8 MiB "
                "backend quota) under a built-in put/get load.",
    actions=ACTIONS,
    invariants=INVARIANTS,
    runbooks=RUNBOOKS,
    make_observer=make_observer,
    make_action_client=make_action_client,
    extra={"options": KvClusterOptions},
)
