"""The cluster observer: each member's /metrics, /health and status, plus the load generator.

Everything comes from interfaces an SRE would use: etcd's own Prometheus text
(parsed by prometheus-client), its /health, its JSON gateway (maintenance
status and alarms), the load generator's put-latency histogram, and the
members' log files. A member that does not answer its status within the
timeout (killed, or SIGSTOPped and hung) is down.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subjects import promtext
from subjects.kvcluster.gateway import EtcdError, Gateway, as_int
from subjects.logtail import LogTail

SCRAPE_TIMEOUT_S = 1.5  # a loaded member may take a second; a hung one never answers
CHURN_WINDOW_S = 60.0
_NOTABLE = ('"level":"warn"', '"level":"error"', '"level":"panic"', '"level":"fatal"',
            "panic:")


@dataclass
class MemberView:
    name: str
    up: bool = False
    healthy: bool = False
    error: str = ""
    member_id: str = ""
    raft_term: int = 0
    leader: str = "0"
    applied: int = 0
    db_size: float = 0.0
    quota: float = 0.0
    alarms: tuple[str, ...] = ()


class KvClusterObserver:
    def __init__(self, endpoints: dict[str, str], loadgen_url: str,
                 log_files: dict[str, Path] | None = None,
                 timeout_s: float = SCRAPE_TIMEOUT_S) -> None:
        self.endpoints = dict(endpoints)
        self.loadgen_url = loadgen_url.rstrip("/")
        self.timeout_s = timeout_s
        self.tails = {name: LogTail(path) for name, path in (log_files or {}).items()}
        self.gw = Gateway(timeout_s)
        self._load_prev: promtext.Samples | None = None
        self._load_prev_at = 0.0
        self._leader: str | None = None
        self._term = 0
        self._changes: deque[float] = deque()

    async def _member(self, name: str, url: str) -> MemberView:
        view = MemberView(name)
        try:
            status, (code, health), (_, text) = await asyncio.gather(
                self.gw.status(url), self.gw.get_text(url, "/health"),
                self.gw.get_text(url, "/metrics"))
            samples = promtext.parse(text)
        except (EtcdError, ValueError) as exc:
            view.error = str(exc)[:300]
            return view
        view.up = True
        view.healthy = code == 200 and '"true"' in health
        header = status.get("header", {})
        view.member_id = str(header.get("member_id", ""))
        view.raft_term = as_int(header.get("raft_term"))
        view.leader = str(status.get("leader") or "0")
        view.applied = as_int(status.get("raftAppliedIndex") or status.get("raftIndex"))
        view.db_size = float(as_int(status.get("dbSize")))
        view.quota = promtext.total(samples, "etcd_server_quota_backend_bytes")
        view.alarms = tuple(str(e) for e in status.get("errors") or [])
        return view

    async def _load(self) -> dict[str, float]:
        """Put latency and errors over the interval since the last scrape."""
        try:
            _, text = await self.gw.get_text(self.loadgen_url, "/metrics")
            cur = promtext.parse(text)
        except (EtcdError, ValueError):
            return {}
        prev, now = self._load_prev, time.monotonic()
        interval = now - self._load_prev_at
        self._load_prev, self._load_prev_at = cur, now
        if prev is None or interval <= 0:
            return {}

        def d(name: str, **where: str) -> float:
            return promtext.delta(promtext.total(cur, name, where),
                                  promtext.total(prev, name, where))

        def p99(name: str) -> float:
            deltas = promtext.bucket_deltas(promtext.buckets(cur, name),
                                            promtext.buckets(prev, name))
            return 1000 * promtext.quantile(0.99, deltas)

        puts = d("kvload_requests_total", op="put")
        failed = puts - d("kvload_requests_total", op="put", outcome="ok")
        return {
            "put_p99_ms": p99("kvload_put_duration_seconds"),
            "get_p99_ms": p99("kvload_get_duration_seconds"),
            "put_rate": puts / interval,
            "put_error_rate": failed / puts if puts > 0 else 0.0,
            "put_nospace_rate": d("kvload_requests_total", op="put", outcome="nospace") / interval,
        }

    def _churn(self, leader: str, term: int, now: float) -> float:
        """Leader changes of one cluster history over the window. A raft term never
        goes down in a living cluster: one that does is a cluster rebuilt from empty
        data dirs (a human's restore), whose first leader is a beginning, not a change."""
        if 0 < term < self._term:
            self._changes.clear()
            self._leader = None
        if term > 0:
            self._term = term
        if leader != "0" and self._leader not in (None, leader):
            self._changes.append(now)
        if leader != "0":
            self._leader = leader
        while self._changes and self._changes[0] < now - CHURN_WINDOW_S:
            self._changes.popleft()
        return float(len(self._changes))

    def _logs(self) -> list[str]:
        lines = []
        for name, tail in self.tails.items():
            lines += [f"{name}: {ln}" for ln in tail.read_new()
                      if any(n in ln for n in _NOTABLE)]
        return lines[-50:]

    async def scrape(self) -> dict[str, Any]:
        views = await asyncio.gather(*(self._member(n, u) for n, u in self.endpoints.items()))
        load = await self._load()
        logs = await asyncio.to_thread(self._logs)
        up = [v for v in views if v.up]
        if not up:
            errors = "; ".join(v.error for v in views)
            down = {"members_down": float(len(views)), "members_up": 0.0, "has_leader": 0.0,
                    "quorum_members": -float(len(views) // 2)}
            return {"up": False, "metrics": down,
                    "log_lines": logs, "error": f"no member answered: {errors}"[:500]}
        metrics = cluster_metrics(views) | load
        leader = leader_of(views)
        term = max((v.raft_term for v in up if v.member_id == leader), default=0)
        metrics["leader_changes_1m"] = self._churn(leader, term, time.monotonic())
        errors = "; ".join(f"{v.name}: {v.error}" for v in views if v.error)
        return {"up": True, "metrics": metrics, "log_lines": logs, "error": errors[:500]}

    async def close(self) -> None:
        await self.gw.close()


def leader_of(views: list[MemberView]) -> str:
    """The leader a majority of all members agree on and that answers itself; "0" if none."""
    up = [v for v in views if v.up]
    ids = {v.member_id for v in up}
    for v in up:
        votes = sum(1 for w in up if w.leader == v.leader)
        if v.leader != "0" and v.leader in ids and votes > len(views) // 2:
            return v.leader
    return "0"


def cluster_metrics(views: list[MemberView]) -> dict[str, float]:
    up = [v for v in views if v.up]
    quota = max((v.quota for v in up), default=0.0)
    db_max = max((v.db_size for v in up), default=0.0)
    nospace = any("NOSPACE" in a for v in up for a in v.alarms)
    applied = [v.applied for v in up]
    db_ratio = db_max / quota if quota > 0 else 0.0
    metrics = {
        "members_total": float(len(views)),
        "members_up": float(len(up)),
        "members_down": float(len(views) - len(up)),
        "members_unhealthy": float(sum(1 for v in views if not v.healthy)),
        "has_leader": 1.0 if leader_of(views) != "0" else 0.0,
        "quorum_members": float(len(up)) - float(len(views) // 2),  # >0: a majority answers
        "raft_lag_entries": float(max(applied) - min(applied)) if applied else 0.0,
        "db_size_max_bytes": db_max,
        "db_size_ratio": db_ratio,
        "nospace_alarm": 1.0 if nospace else 0.0,
        # One number for low_disk_space: the fullest member's share of the quota, or 1
        # while a NOSPACE alarm stands (writes fail until it is disarmed).
        "disk_pressure": 1.0 if nospace else db_ratio,
    }
    for v in views:
        metrics[f"{v.name}_up"] = 1.0 if v.up else 0.0
        metrics[f"{v.name}_db_size_bytes"] = v.db_size
        metrics[f"{v.name}_applied_index"] = float(v.applied)
    return metrics
