"""The etcd cluster subject, end to end on three real etcd members under load.

The last test runs the embedded launcher (`python -m subjects.kvcluster serve`)
as `menders up` does, with its own cluster.

One cluster and one load generator serve the whole module. Each fault test
injects through the chaos hooks, watches the symptom through the real
observer, checks that a plausible wrong action leaves it broken and that the
right action (or the ordered repair) cures it on fresh observations. The
unfixable fault runs last and the harness rebuilds the cluster after it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bus_schemas import messages as m_
from subjects.base import ActionError, InvariantSpec
from subjects.kvcluster import chaos
from subjects.kvcluster.client import KvClusterActionClient, RemedyFailed
from subjects.kvcluster.definition import DEFINITION
from subjects.kvcluster.gateway import Gateway
from subjects.kvcluster.layout import LOADGEN_PORT_OFFSET, Layout, free_port, with_free_ports
from subjects.kvcluster.observer import KvClusterObserver
from subjects.kvcluster.procman import LocalProcessManager
from subjects.kvcluster.runbooks import NOSPACE_REPAIR
from subjects.rules import match_condition
from tests.harness import Bus, plan_of, require_binary, start_crew, step

pytestmark = pytest.mark.e2e

SCRAPE_EVERY_S = 0.5
BREAK_WITHIN_S = 15.0
CURE_WITHIN_S = 15.0
STAYS_BROKEN_S = 3.0  # a wrong action is judged on this many seconds of fresh scrapes


@dataclass
class Cluster:
    layout: Layout
    procman: LocalProcessManager
    loadgen: subprocess.Popen[bytes]
    loadgen_url: str

    def observer(self) -> KvClusterObserver:
        logs = {n: self.layout.log_file(n) for n in self.layout.names}
        return KvClusterObserver(self.layout.endpoints, self.loadgen_url, logs)

    def client(self) -> KvClusterActionClient:
        return KvClusterActionClient(self.layout, self.procman)

    def fault(self, name: str) -> chaos.Fault:
        return chaos.FAULTS[name](self.layout, self.procman)


@pytest.fixture(scope="module")
def kv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_binary("etcd", "etcd-server")
    layout = with_free_ports(tmp_path_factory.mktemp("kvcluster"))
    layout.save()
    procman = LocalProcessManager(layout)
    port = free_port()
    out = (layout.home / "loadgen.log").open("wb")
    loadgen = None
    try:
        asyncio.run(chaos.start_cluster(layout, procman))
        loadgen = subprocess.Popen(
            [sys.executable, "-m", "subjects.kvcluster", "loadgen", "--port", str(port),
             "--endpoints", ",".join(layout.endpoints.values()), "--rps", "40"],
            stdout=out, stderr=subprocess.STDOUT)
        yield Cluster(layout, procman, loadgen, f"http://127.0.0.1:{port}")
    finally:
        if loadgen is not None:
            loadgen.terminate()
            loadgen.wait(timeout=5)
        procman.stop_all()
        out.close()


def broken(spec: InvariantSpec, metrics: dict[str, float]) -> bool:
    value = metrics.get(spec.metric)
    if value is None:
        return False
    return value >= spec.threshold if spec.op == "<" else value <= spec.threshold


def cleared(spec: InvariantSpec, metrics: dict[str, float]) -> bool:
    value = metrics.get(spec.metric)
    if value is None:
        return False
    limit = spec.clear if spec.clear is not None else spec.threshold
    return value < limit if spec.op == "<" else value > limit


class Watch:
    """Fresh scrapes of one observer, until a predicate holds or a deadline passes."""

    def __init__(self, observer: KvClusterObserver) -> None:
        self.observer = observer
        self.last: dict[str, Any] = {}
        self.logs: list[str] = []

    async def scrape(self) -> dict[str, float]:
        self.last = await self.observer.scrape()
        self.logs += self.last["log_lines"]
        return dict(self.last["metrics"])

    async def until(self, pred: Callable[[dict[str, float]], bool], within_s: float,
                    what: str, times: int = 1) -> dict[str, float]:
        deadline = time.monotonic() + within_s
        run = 0
        while True:
            metrics = await self.scrape()
            run = run + 1 if pred(metrics) else 0
            if run >= times:
                return metrics
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not seen within {within_s}s: {self.last}")
            await asyncio.sleep(SCRAPE_EVERY_S)

    async def stays(self, pred: Callable[[dict[str, float]], bool], for_s: float,
                    what: str) -> None:
        deadline = time.monotonic() + for_s
        while time.monotonic() < deadline:
            metrics = await self.scrape()
            assert pred(metrics), f"{what} stopped holding: {self.last}"
            await asyncio.sleep(SCRAPE_EVERY_S)

    async def breaks(self, invariant: str) -> dict[str, float]:
        spec = DEFINITION.invariant(invariant)
        return await self.until(lambda m: broken(spec, m), BREAK_WITHIN_S,
                                f"{invariant} broken")

    async def stays_broken(self, invariant: str) -> None:
        spec = DEFINITION.invariant(invariant)
        await self.stays(lambda m: broken(spec, m), STAYS_BROKEN_S, f"{invariant} broken")

    async def cured(self, invariant: str) -> dict[str, float]:
        spec = DEFINITION.invariant(invariant)
        return await self.until(lambda m: cleared(spec, m), CURE_WITHIN_S,
                                f"{invariant} cleared", times=2)


def assert_holds(metrics: dict[str, float], *invariants: str) -> None:
    """A fault breaks its own invariant, not these unrelated ones."""
    for name in invariants:
        assert not broken(DEFINITION.invariant(name), metrics), f"{name} broke too: {metrics}"


def best_rule_actions(invariant: str, metrics: dict[str, float], logs: list[str],
                      ) -> tuple[str, bool, list[str]]:
    """(rule name, escalate, action names) of the most confident matching runbook rule."""
    matching = [r for r in DEFINITION.runbooks
                if r.invariant in (None, invariant)
                and all(match_condition(metrics.get(k, float("nan")), c) for k, c in r.when.items())
                and all(any(n in ln for ln in logs) for n in r.log_contains)]
    assert matching, f"no runbook rule for {invariant} on {metrics}"
    rule = max(matching, key=lambda r: r.confidence)
    return rule.name, rule.escalate, [a.action for a in rule.actions]


async def run(kv: Cluster, action: str, params: dict[str, Any] | None = None) -> str:
    client = kv.client()
    try:
        spec = DEFINITION.actions.get(action)
        return await client.run(action, params or {}, spec.timeout_s if spec else 5.0)
    finally:
        await client.close()


async def healthy(kv: Cluster) -> Watch:
    """A fresh watch on a cluster whose invariants all hold (after a fault's clear)."""
    watch = Watch(kv.observer())
    await watch.until(lambda m: all(cleared(s, m) for s in DEFINITION.invariants
                                    if s.name != "leader_churn") and m.get("put_rate", 0) > 0,
                      30.0, "a healthy cluster", times=2)
    return watch


async def test_the_cluster_forms_with_one_leader_and_every_invariant_measured(kv: Cluster,
                                                                              ) -> None:
    watch = await healthy(kv)
    m = await watch.until(lambda m: m["members_up"] == 3 and m.get("put_p99_ms", 0) > 0,
                          10.0, "three members answering under load")
    assert m["members_down"] == 0
    assert m["has_leader"] == 1.0 and m["quorum_members"] > 0
    assert 0 < m["put_p99_ms"] < 500, "put p99 is measured from the load generator"
    assert m["put_error_rate"] == 0.0
    assert 0 < m["db_size_ratio"] < 0.8 and m["nospace_alarm"] == 0.0
    assert m["raft_lag_entries"] < 1000
    indexes = [m[f"{n}_applied_index"] for n in kv.layout.names]
    assert min(indexes) > 0 and max(indexes) - min(indexes) == m["raft_lag_entries"]
    await watch.observer.close()


async def test_leader_churn_is_counted_from_real_leader_changes(kv: Cluster) -> None:
    watch = await healthy(kv)
    before = (await watch.scrape())["leader_changes_1m"]
    for _ in range(2):
        detail = await run(kv, "move_leader")
        assert "leadership moved" in detail
        await watch.until(lambda m: m["has_leader"] == 1.0, 10.0, "a leader")
    await watch.until(lambda m: m["leader_changes_1m"] >= before + 2, 10.0,
                      "two leader changes")
    await watch.observer.close()


async def test_member_killed_is_cured_by_a_restart_not_by_moving_the_leader(kv: Cluster,
                                                                            ) -> None:
    watch = await healthy(kv)
    fault = kv.fault("member_killed")
    await fault.inject()
    try:
        await watch.breaks("member_down")
        # If m3 led, the first look may fall inside the election: wait it out.
        m = await watch.until(lambda m: m["has_leader"] == 1.0, BREAK_WITHIN_S, "a new leader")
        assert m["members_down"] == 1 and m["m3_up"] == 0.0
        assert_holds(m, "low_disk_space", "raft_lag", "no_leader")
        _rule, escalate, actions = best_rule_actions("member_down", m, watch.logs)
        assert not escalate and actions[0] == "restart_member"
        await run(kv, "move_leader")  # plausible (a leader problem?), and useless here
        await watch.stays_broken("member_down")
        assert "healthy" in await run(kv, "restart_member")
        await watch.cured("member_down")
        assert not fault.effective()
    finally:
        await fault.clear()  # a failed assertion must not leave m3 down for the next test
        await watch.observer.close()


async def test_member_hung_times_out_and_only_a_restart_cures_it(kv: Cluster) -> None:
    watch = await healthy(kv)
    fault = kv.fault("member_hung")
    await fault.inject()
    try:
        m = await watch.breaks("member_down")
        assert m["members_down"] == 1 and m["m3_up"] == 0.0
        assert kv.procman.running("m3"), "hung, not dead: the process is still there"
        with pytest.raises(ActionError, match="refused: m3 down"):
            await run(kv, "defragment", {"member": "m1"})  # blast radius: quorum at risk
        await run(kv, "compact")
        await watch.stays_broken("member_down")
        assert "restarted" in await run(kv, "restart_member", {"member": "m3"})
        await watch.cured("member_down")
        assert not fault.effective()
    finally:
        await fault.clear()
        await watch.observer.close()


async def leader_name(kv: Cluster) -> str:
    gw = Gateway()
    try:
        statuses = {n: await gw.status(u) for n, u in kv.layout.endpoints.items()}
    finally:
        await gw.close()
    leader = next(iter(statuses.values()))["leader"]
    return next(n for n, s in statuses.items() if s["header"]["member_id"] == leader)


async def test_a_hung_leader_makes_puts_slow_until_it_is_restarted(kv: Cluster) -> None:
    watch = await healthy(kv)
    fault = kv.fault("member_hung")
    fault.target = await leader_name(kv)
    await fault.inject()
    try:
        m = await watch.breaks("high_latency")
        assert m["put_p99_ms"] >= 1000, "puts wait on the hung member until they time out"
        m = await watch.breaks("member_down")
        assert m[f"{fault.target}_up"] == 0.0
        await watch.until(lambda m: m["has_leader"] == 1.0, BREAK_WITHIN_S,
                          "a new leader among the other two")
        await run(kv, "move_leader")  # leadership already moved: latency stays
        await watch.stays_broken("high_latency")
        await run(kv, "restart_member", {"member": fault.target})
        await watch.cured("high_latency")
        await watch.cured("member_down")
    finally:
        await fault.clear()
        await watch.observer.close()


async def test_nospace_is_cured_by_compact_defrag_each_then_disarm_not_by_disarm_alone(
        kv: Cluster) -> None:
    watch = await healthy(kv)
    fault = kv.fault("nospace")
    await fault.inject()
    m = await watch.breaks("low_disk_space")
    assert m["nospace_alarm"] == 1.0
    assert_holds(m, "member_down", "no_leader", "raft_lag")
    m = await watch.until(lambda m: m.get("put_error_rate", 0) > 0.5, 10.0, "puts failing")
    rule, _escalate, actions = best_rule_actions("low_disk_space", m, watch.logs)
    [remedy] = NOSPACE_REPAIR  # one remedy of five steps, one plan
    assert rule == "nospace_alarm" and actions == [remedy.action]
    assert [(st.action, st.depends_on) for st in remedy.steps] == [
        ("compact", []), ("defragment", ["compact"]), ("defragment", ["compact"]),
        ("defragment", ["compact"]), ("disarm_alarm", ["defrag_m1", "defrag_m2", "defrag_m3"])]
    await run(kv, "disarm_alarm")  # the tempting shortcut: the next put raises it again
    await watch.stays_broken("low_disk_space")
    details = [await run(kv, step.action, dict(step.params)) for step in remedy.steps]
    assert "compacted" in details[0] and all("defragmented" in d for d in details[1:4])
    m = await watch.cured("low_disk_space")
    assert m["nospace_alarm"] == 0.0
    await watch.until(lambda m: m.get("put_rate", 0) > 0 and m["put_error_rate"] == 0.0,
                      10.0, "puts accepted again")
    await watch.observer.close()


async def test_data_dir_removed_needs_remove_and_re_add_not_a_restart(kv: Cluster) -> None:
    watch = await healthy(kv)
    fault = kv.fault("data_dir_removed")
    await fault.inject()
    try:
        m = await watch.breaks("member_down")
        assert m["members_down"] == 1
        assert_holds(m, "low_disk_space", "raft_lag")
        _rule, escalate, actions = best_rule_actions("member_down", m, watch.logs)
        assert "replace_member" in actions and not escalate
        with pytest.raises(ActionError, match="refused: m3 has no data"):
            await run(kv, "restart_member", {"member": "m3"})  # it must not rejoin empty
        await watch.stays_broken("member_down")
        detail = await run(kv, "replace_member")
        assert "re-added as a new member" in detail
        await watch.cured("member_down")
    finally:
        await fault.clear()
        await watch.observer.close()


def crew_config(kv: Cluster) -> str:
    """The governor and executor in charge of this cluster as subject `kv` (not embedded:
    the fixture runs it)."""
    return (f'[governor]\nmode = "execute"\nallow = {{ kv = ["*"] }}\n'
            f'approval_above = "medium"\n[runtime]\nheartbeat_s = 0.5\n'
            f'[subjects.kv]\nkind = "kvcluster"\nurl = "{kv.loadgen_url}"\n'
            f'embedded = false\n[subjects.kv.options]\ncluster_dir = "{kv.layout.home}"\n')


async def test_the_precondition_refuses_a_defragment_while_another_member_is_down(
        kv: Cluster, bus: Bus) -> None:
    """Blast radius on fresh state: the governor approves the step (policy allows it),
    and the executor, asking etcd right before it starts, refuses it."""
    watch = await healthy(kv)
    fault = kv.fault("member_killed")
    bus.write_config(crew_config(kv))
    await start_crew(bus, "governor", "executor")
    try:
        await fault.inject()
        m = await watch.breaks("member_down")
        down = next(n for n in kv.layout.names if m.get(f"{n}_up") == 0.0)
        up = next(n for n in kv.layout.names if n != down)
        plan = plan_of(step("defragment", "defrag", params={"member": up}), subject="kv")
        async with bus.collect() as col:
            await bus.publish("planner", plan)
            [end] = await col.wait_for(lambda e: isinstance(e, m_.PlanEnded)
                                       and e.plan_id == plan.plan_id, 30.0)
        [approved] = [a for a in col.events(m_.ExecutionApproved) if a.plan_id == plan.plan_id]
        assert approved.step.disruptive  # the registry's word, whatever the plan said
        [result] = [r for r in col.events(m_.ExecutionResult) if r.plan_id == plan.plan_id]
        assert (result.status, result.rule, result.tries) == ("skipped", "precondition", 0)
        assert f"{down} down; taking {up} out too would risk quorum" in result.detail
        assert end.outcome == "failed" and end.deciding is not None
        assert end.deciding.rule == "precondition"
    finally:
        await fault.clear()
        await watch.observer.close()


async def test_bad_action_parameters_are_refused_with_a_clear_error(kv: Cluster) -> None:
    with pytest.raises(ActionError, match="bad parameters"):
        await run(kv, "defragment", {"member": "../../etc"})
    with pytest.raises(ActionError, match="no member 'm7'"):
        await run(kv, "restart_member", {"member": "m7"})
    with pytest.raises(ActionError, match="bad parameters"):
        await run(kv, "disarm_alarm", {"alarm": "CORRUPT"})
    with pytest.raises(ActionError, match="unknown action"):
        await run(kv, "force_new_cluster")
    with pytest.raises(ActionError, match="refused: m1 answers"):
        await run(kv, "replace_member", {"member": "m1"})
    with pytest.raises(ActionError, match="refused: name the member"):
        await run(kv, "restart_member")  # nobody is down: which one?


async def test_quorum_lost_is_cured_by_no_action_and_its_runbook_asks_for_a_human(
        kv: Cluster) -> None:
    watch = await healthy(kv)
    fault = kv.fault("quorum_lost")
    await fault.inject()
    try:
        m = await watch.breaks("member_down")
        m = await watch.until(lambda m: m["has_leader"] == 0.0, BREAK_WITHIN_S, "no leader")
        assert m["members_down"] == 2 and m["quorum_members"] <= 0
        for invariant in ("member_down", "no_leader"):
            rule, escalate, actions = best_rule_actions(invariant, m, watch.logs)
            assert (rule, escalate, actions) == ("quorum_lost", True, [])
        attempts: list[tuple[str, dict[str, Any]]] = [
            ("restart_member", {"member": "m2"}), ("replace_member", {"member": "m3"}),
            ("restart_member", {"member": "m1"}), ("move_leader", {}), ("compact", {}),
        ]
        for action, params in attempts:
            try:
                detail = await run(kv, action, params)
            except (ActionError, RemedyFailed):
                continue
            pytest.fail(f"{action} {params} claims success without quorum: {detail}")
        await watch.stays(lambda m: m["members_down"] >= 2 and m["has_leader"] == 0.0,
                          STAYS_BROKEN_S, "quorum lost")
    finally:
        await fault.clear()
        await watch.observer.close()


# --- the embedded cluster as `menders up` runs it: python -m subjects.kvcluster serve ---


def free_base_port() -> int:
    """A base port with the 7 ports after it free (members' client/peer, load metrics)."""
    for _ in range(50):
        base = free_port()
        if base + LOADGEN_PORT_OFFSET > 65535:
            continue
        try:
            socks = []
            for port in range(base, base + LOADGEN_PORT_OFFSET + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no 7 consecutive free ports")


class Cfg:
    def __init__(self, url: str, cluster_dir: Path) -> None:
        self.url = url
        self.options: dict[str, Any] = {"cluster_dir": str(cluster_dir)}


async def _until(observer: Any, pred: Any, within_s: float, what: str) -> dict[str, float]:
    deadline = time.monotonic() + within_s
    while True:
        obs = await observer.scrape()
        if pred(obs["metrics"]):
            return dict(obs["metrics"])
        assert time.monotonic() < deadline, f"{what} not seen: {obs}"
        await asyncio.sleep(0.5)


@dataclass
class Served:
    base: int
    chaos_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    require_binary("etcd", "etcd-server")
    base, chaos_port = free_base_port(), free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "subjects.kvcluster", "serve", "--port", str(base),
             "--chaos-port", str(chaos_port), "--data-dir", str(tmp_path / "kv"),
             "--options", json.dumps({"load_rps": 30})], stdout=log, stderr=subprocess.STDOUT)
        try:
            yield Served(base, chaos_port, tmp_path / "kv", proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def stop_and_list_survivors(served: Served) -> list[int]:
    """SIGTERM the launcher; the PIDs of its members still running afterwards."""
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=20) == 0
    layout = Layout.load(served.data_dir)
    pids = [int(layout.pid_file(n).read_text()) for n in layout.names]
    # A member restarted by this test's client is its child: a zombie once stopped.
    return [p for p in pids if Path(f"/proc/{p}").exists()
            and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


async def test_the_embedded_cluster_serves_chaos_and_stops_its_members_on_sigterm(
        served: Served) -> None:
    cfg = Cfg(f"http://127.0.0.1:{served.base}", served.data_dir)
    observer = DEFINITION.make_observer(cfg)
    client = DEFINITION.make_action_client(cfg)
    try:
        m = await _until(observer, lambda m: m.get("members_up") == 3 and
                         m.get("put_p99_ms", 0) > 0, 40.0, "three members under load")
        assert m["has_leader"] == 1.0
        chaos_url = f"http://127.0.0.1:{served.chaos_port}/faults/member_killed"
        async with aiohttp.ClientSession() as http, http.post(chaos_url) as r:
            assert r.status == 200, await r.text()
        await _until(observer, lambda m: m.get("members_down") == 1, 15.0, "a member down")
        assert "healthy" in await client.run("restart_member", {}, 20.0)
        await _until(observer, lambda m: m.get("members_down") == 0, 15.0, "all back")
    finally:
        await observer.close()
        await client.close()
    assert stop_and_list_survivors(served) == []
