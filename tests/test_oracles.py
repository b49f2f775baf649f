"""Each subject's independent oracle (`GET /oracle` on its chaos port), end to end.

Each subject runs as its own process, as `menders up` runs it. Per fault: the
oracle reads healthy, then failing with the fault's specific reason, then
healthy again once the crew's cure ran on the subject's real action path (the
service's POST /actions/<name>; for the kvcluster, whose actions the executor
runs against etcd itself, its action client) while the chaos flag stays set:
the oracle judges the subject, not the flag. And `effects` counts that cure
exactly once, and nothing the harness's own repairs did.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from subjects.kvcluster.definition import DEFINITION as KV
from tests.harness import free_port_run, require_binary, served_subject

pytestmark = pytest.mark.e2e

ANSWER_WITHIN_S = 1.5  # the contract: well under 2 s, however broken the subject
POLL_S = 0.25


@dataclass
class Served:
    kind: str
    url: str  # the subject's configured url
    chaos: str
    data: Path


def _ports(count: int = 1) -> tuple[int, int]:
    return free_port_run(count), free_port_run(1)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def oracle(http: aiohttp.ClientSession, served: Served) -> dict[str, Any]:
    started = time.monotonic()
    async with http.get(f"{served.chaos}/oracle") as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
    took = time.monotonic() - started
    assert took < ANSWER_WITHIN_S, f"/oracle took {took:.2f}s: {body}"
    assert set(body) >= {"healthy", "failing", "degraded", "effects"}, body
    assert body["healthy"] is (body["failing"] == []), body
    return body


async def until(http: aiohttp.ClientSession, served: Served, healthy: bool, within_s: float,
                needle: str = "", times: int = 1) -> dict[str, Any]:
    """The oracle's reading once it says `healthy` (naming `needle` among its failing
    reasons, when broken) on `times` readings in a row."""
    deadline = time.monotonic() + within_s
    run = 0
    while True:
        body = await oracle(http, served)
        hit = body["healthy"] is healthy and (
            healthy or any(needle in reason for reason in body["failing"]))
        run = run + 1 if hit else 0
        if run >= times:
            return body
        assert time.monotonic() < deadline, (
            f"oracle not {'healthy' if healthy else needle!r} within {within_s}s: {body}")
        await asyncio.sleep(POLL_S)


async def chaos(http: aiohttp.ClientSession, served: Served, method: str, path: str,
                ) -> dict[str, Any]:
    async with http.request(method, f"{served.chaos}{path}") as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


class _Cfg:
    def __init__(self, url: str, cluster_dir: Path) -> None:
        self.url = url
        self.options: dict[str, Any] = {"cluster_dir": str(cluster_dir)}


async def act(http: aiohttp.ClientSession, served: Served, action: str,
              params: dict[str, Any]) -> str:
    """The cure as the executor runs it: POST /actions/<name> on the service's URL; for
    the kvcluster, which serves no actions, its action client against etcd itself."""
    if served.kind == "kvcluster":
        client = KV.make_action_client(_Cfg(served.url, served.data))
        try:
            return str(await client.run(action, params, KV.actions[action].timeout_s))
        finally:
            await client.close()
    async with http.post(f"{served.url}/actions/{action}", json=params) as resp:
        reply = await resp.json()
        assert resp.status == 200 and reply["ok"], reply
        return str(reply["detail"])


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """The effects between two readings, only those that changed."""
    b, a = before["effects"], after["effects"]
    return {k: int(a.get(k, 0)) - int(b.get(k, 0)) for k in a if a.get(k) != b.get(k)}


async def still_injected(http: aiohttp.ClientSession, served: Served, fault: str) -> None:
    listing = await chaos(http, served, "GET", "/faults")
    assert fault in listing["active"], listing  # cured by the crew, never cleared by chaos


Cure = tuple[str, dict[str, Any]]


async def fault_then_cure(http: aiohttp.ClientSession, served: Served, fault: str,
                          needle: str, cures: list[Cure], *, break_within_s: float = 10.0,
                          cure_within_s: float = 15.0, down_first: str = "") -> dict[str, int]:
    """Healthy, failing naming `needle`, healthy after `cures`; the effects in between."""
    before = await until(http, served, True, 30.0, times=2)
    await chaos(http, served, "POST", f"/faults/{fault}")
    broken = await until(http, served, False, break_within_s, needle)
    if down_first:  # a cure that needs the member gone (replace_member) waits for it
        await until(http, served, False, 60.0, down_first)
    for action, params in cures:
        await act(http, served, action, params)
    after = await until(http, served, True, cure_within_s, times=2)
    await still_injected(http, served, fault)
    print(f"\n{fault}: {broken['failing']} -> healthy after {[a for a, _ in cures]}")
    return delta(before, after)


# --- webshop ------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port, chaos_port = _ports()
    data = tmp_path_factory.mktemp("shop")
    with served_subject("webshop", data, port, chaos_port):
        yield Served("webshop", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{chaos_port}",
                     data)


SHOP_CASES = [
    ("pool_exhaustion", "held over 2 s (leaked)", "recycle_pool", {}),
    ("bad_config", "config v2", "rollback_config", {"version": "last_good"}),
    ("memory_leak", "worker:", "restart_worker", {}),
    ("cache_off", "cache: disabled", "enable_cache", {}),
]


class TestWebshop:
    async def test_a_fresh_shop_is_healthy_and_has_done_nothing(
            self, shop: Served, http: aiohttp.ClientSession) -> None:
        body = await until(http, shop, True, 10.0)
        assert body["degraded"] == [] and set(body["effects"].values()) == {0}
        assert "recycle_pool" in body["effects"]

    @pytest.mark.parametrize(("fault", "needle", "action", "params"), SHOP_CASES,
                             ids=[c[0] for c in SHOP_CASES])
    async def test_fault_fails_the_oracle_and_the_cure_alone_heals_it(
            self, shop: Served, http: aiohttp.ClientSession, fault: str, needle: str,
            action: str, params: dict[str, Any]) -> None:
        try:
            done = await fault_then_cure(http, shop, fault, needle, [(action, params)])
            assert done == {action: 1}
        finally:
            await chaos(http, shop, "DELETE", f"/faults/{fault}")

    async def test_an_unreachable_upstream_fails_until_it_is_back(
            self, shop: Served, http: aiohttp.ClientSession) -> None:
        await until(http, shop, True, 10.0)
        await chaos(http, shop, "POST", "/faults/upstream_down")
        try:
            await until(http, shop, False, 5.0, "upstream: payments")
        finally:
            await chaos(http, shop, "DELETE", "/faults/upstream_down")
        await until(http, shop, True, 5.0)


# --- ratelimiter --------------------------------------------------------------------------


@pytest.fixture(scope="class")
def limiter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_binary("redis-server", "redis-server")
    port, chaos_port = _ports()
    data = tmp_path_factory.mktemp("ratelimiter")
    with served_subject("ratelimiter", data, port, chaos_port):
        yield Served("ratelimiter", f"http://127.0.0.1:{port}",
                     f"http://127.0.0.1:{chaos_port}", data)


AUTO = {"node": "auto"}
LIMITER_CASES = [
    ("node_killed", "node-2: process not running", "restart_node", AUTO),
    ("counters_without_ttl", "rl:w:scraper: no TTL", "repair_counters",
     {"pattern": "rl:w:*", "reset": True}),
    ("bad_build", "node-3: runs build 1.5.0-rc1", "rollback_build", AUTO),
    ("redis_link_cut", "node-1: uses Redis on port", "reconnect_node", AUTO),
]


class TestRatelimiter:
    @pytest.mark.parametrize(("fault", "needle", "action", "params"), LIMITER_CASES,
                             ids=[c[0] for c in LIMITER_CASES])
    async def test_fault_fails_the_oracle_and_the_cure_alone_heals_it(
            self, limiter: Served, http: aiohttp.ClientSession, fault: str, needle: str,
            action: str, params: dict[str, Any]) -> None:
        try:
            done = await fault_then_cure(http, limiter, fault, needle, [(action, params)])
            assert done == {action: 1}
        finally:
            await chaos(http, limiter, "POST", "/reset")

    async def test_a_failover_cures_a_killed_primary_and_leaves_it_degraded(
            self, limiter: Served, http: aiohttp.ClientSession) -> None:
        try:
            done = await fault_then_cure(http, limiter, "primary_killed", "process not running",
                                         [("failover_redis", {})])
            assert done == {"failover_redis": 1}
            body = await oracle(http, limiter)
            # No action restarts a redis-server: the old primary stays down.
            assert [d for d in body["degraded"] if "replica" in d], body
        finally:
            before = await oracle(http, limiter)
            await chaos(http, limiter, "POST", "/reset")
        after = await until(http, limiter, True, 20.0, times=2)
        assert after["degraded"] == [] and delta(before, after) == {}  # repairs: no effects


# --- kvcluster ----------------------------------------------------------------------------


@pytest.fixture(scope="class")
def kv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_binary("etcd", "etcd-server")
    base, chaos_port = _ports(7)
    data = tmp_path_factory.mktemp("kvcluster")
    with served_subject("kvcluster", data, base, chaos_port, {"load_rps": 30}):
        yield Served("kvcluster", f"http://127.0.0.1:{base}", f"http://127.0.0.1:{chaos_port}",
                     data)


NOSPACE_REPAIR: list[Cure] = [("compact", {}), ("defragment", {"member": "m1"}),
                              ("defragment", {"member": "m2"}),
                              ("defragment", {"member": "m3"}), ("disarm_alarm", {})]
KV_CASES: list[tuple[str, str, list[Cure], dict[str, int]]] = [
    ("member_killed", "m3: etcd process not running", [("restart_member", {})],
     {"restart_member": 1}),
    ("member_hung", "m3: etcd process stopped", [("restart_member", {})],
     {"restart_member": 1}),
    ("nospace", "NOSPACE alarm raised", NOSPACE_REPAIR,
     {"compact": 1, "defragment": 3, "disarm_alarm": 1}),
    ("data_dir_removed", "m3: data dir lost its WAL", [("replace_member", {})],
     {"replace_member": 1}),
]


class TestKvCluster:
    @pytest.mark.parametrize(("fault", "needle", "cures", "effects"), KV_CASES,
                             ids=[c[0] for c in KV_CASES])
    async def test_fault_fails_the_oracle_and_the_cure_alone_heals_it(
            self, kv: Served, http: aiohttp.ClientSession, fault: str, needle: str,
            cures: list[Cure], effects: dict[str, int]) -> None:
        try:
            # A member whose data dir is gone answers until its next snapshot panics it.
            down = "m3: etcd process not running" if fault == "data_dir_removed" else ""
            done = await fault_then_cure(http, kv, fault, needle, cures, down_first=down,
                                         cure_within_s=45.0 if down else 15.0)
            assert done == effects
        finally:
            await chaos(http, kv, "DELETE", f"/faults/{fault}")

    async def test_a_lost_quorum_fails_fast_and_the_harness_rebuild_is_no_effect(
            self, kv: Served, http: aiohttp.ClientSession) -> None:
        before = await until(http, kv, True, 20.0, times=2)
        await chaos(http, kv, "POST", "/faults/quorum_lost")
        try:
            broken = await until(http, kv, False, 10.0, "no quorum")
            assert any("m2: etcd process not running" in r for r in broken["failing"])
        finally:
            await chaos(http, kv, "DELETE", "/faults/quorum_lost")  # a brand-new cluster
        after = await until(http, kv, True, 30.0, times=2)
        assert delta(before, after) == {}  # the launcher's own starts are not the crew's


def test_the_kvcluster_tracker_counts_each_effect_once_from_pids_and_member_logs(
        tmp_path: Path) -> None:
    """Replays, shutdown handovers, raft entries logged by every member and the launcher's
    own starts: none counts twice, or at all."""
    from subjects.kvcluster.layout import Layout, Member
    from subjects.kvcluster.oracle import EffectTracker, OwnedProcessManager

    layout = Layout(tmp_path, tuple(Member(n, 10 + i, 20 + i) for i, n in
                                    enumerate(("m1", "m2", "m3"))))
    for i, name in enumerate(layout.names):
        layout.log_file(name).parent.mkdir(parents=True, exist_ok=True)
        layout.log_file(name).write_text('{"msg":"from an older run: not counted",'
                                         '"compact-revision":1}\n')
        layout.pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        layout.pid_file(name).write_text(str(100 * (i + 1)))
    procman = OwnedProcessManager(layout)
    tracker = EffectTracker(layout, procman)

    def log(name: str, *msgs: str, **fields: Any) -> None:
        extra = "".join(f',"{k.replace("_", "-")}":{json.dumps(v)}' for k, v in fields.items())
        with layout.log_file(name).open("a") as f:
            f.writelines(f'{{"level":"info","msg":"{m}"{extra}}}\n' for m in msgs)

    def pid(name: str, value: int) -> None:
        layout.pid_file(name).write_text(str(value))
        tracker.poll()

    for name in layout.names:
        log(name, "finished scheduled compaction", compact_revision=5)
    log("m1", "leadership transfer finished")  # move_leader
    log("m2", "received signal; shutting down", "leadership transfer finished")  # handover
    pid("m2", 201)  # the crew restarted it
    log("m2", "starting an etcd server", "finished scheduled compaction")  # replayed
    log("m2", "published local member to cluster through raft")
    for name in layout.names:
        log(name, "finished scheduled compaction", compact_revision=9)
    log("m1", "removed member", removed_remote_peer_urls=[layout.member("m3").peer_url])
    pid("m3", 301)  # ... and replaced m3
    procman.own.add(302)
    pid("m3", 302)  # the launcher's own repair
    log("m1", "finished defragment")
    log("m1", "alarm disarmed")
    log("m2", "alarm disarmed")
    assert {k: v for k, v in tracker.effects().items() if v} == {
        "compact": 2, "move_leader": 1, "restart_member": 1, "replace_member": 1,
        "defragment": 1, "disarm_alarm": 1}
