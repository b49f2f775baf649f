"""What each registered action does to the cluster (run by the manager, never by an actor)."""

from __future__ import annotations

import asyncio
import dataclasses

import msgspec
from redis.exceptions import RedisError

from subjects.base import ActionError, NoParams
from subjects.ratelimiter import keys
from subjects.ratelimiter.actions import NodeParams, RepairCountersParams, SetLimitParams
from subjects.ratelimiter.cluster import Cluster, ClusterError, NodeHandle
from subjects.ratelimiter.node import NodeConfig


def _pick(cluster: Cluster, selector: str, at_fault: list[NodeHandle]) -> list[NodeHandle]:
    if selector == "auto":
        return at_fault
    if selector == "all":
        return list(cluster.nodes)
    try:
        return [cluster.node(selector)]
    except KeyError:
        known = ", ".join(n.id for n in cluster.nodes)
        raise ActionError(f"node: no node {selector!r}; known: {known}") from None


def _names(nodes: list[NodeHandle]) -> str:
    return ", ".join(n.id for n in nodes) or "none"


async def restart_node(cluster: Cluster, p: NodeParams) -> str:
    down = [n for n in cluster.nodes if await cluster.health(n) is None]
    chosen = _pick(cluster, p.node, down)
    for node in chosen:
        await asyncio.to_thread(cluster.pm.stop, node.id)
        await cluster.start_node(node)
    return f"restarted {_names(chosen)}"


def _linked(cfg: NodeConfig, cluster: Cluster) -> bool:
    return cfg.store == "redis" and cfg.redis_port == cluster.servers[cluster.primary].port


async def reconnect_node(cluster: Cluster, p: NodeParams) -> str:
    faulty = []
    for node in cluster.nodes:
        health = await cluster.health(node)
        if health is not None and (not health["redis_ok_recently"] or health["store"] != "redis"
                                   or not _linked(cluster.node_config(node), cluster)):
            faulty.append(node)
    chosen = _pick(cluster, p.node, faulty)
    port = cluster.servers[cluster.primary].port
    for node in chosen:
        cfg = dataclasses.replace(cluster.node_config(node), redis_host="127.0.0.1",
                                  redis_port=port, store="redis")
        await cluster.reload_node(node, cfg)
    return f"reconnected {_names(chosen)} to the primary on port {port}"


async def failover_redis(cluster: Cluster, _: NoParams) -> str:
    old, new = cluster.primary, cluster.replica
    promoted = cluster.redis(new)
    try:
        role = (await promoted.info("replication"))["role"]
        await promoted.execute_command("REPLICAOF", "NO", "ONE")
    except (RedisError, OSError) as exc:
        raise ClusterError(f"no replica to promote: {new} does not answer ({exc})") from None
    if role not in ("slave", "master"):
        raise ClusterError(f"{new} has role {role!r}")
    cluster.primary, cluster.replica = new, old
    demoted = "not reachable, left down"
    try:
        await asyncio.wait_for(cluster.redis(old).execute_command(
            "REPLICAOF", "127.0.0.1", str(cluster.servers[new].port)), 1.0)
        demoted = "now its replica"
    except (RedisError, OSError, TimeoutError):
        pass
    port = cluster.servers[new].port
    for node in cluster.nodes:
        cfg = dataclasses.replace(cluster.node_config(node), redis_port=port)
        await cluster.reload_node(node, cfg)
    cluster.log.write("warning", "redis failover", primary=new, old_primary=old)
    return f"promoted {new} (port {port}); old primary {old} {demoted}; nodes repointed"


async def repair_counters(cluster: Cluster, p: RepairCountersParams) -> str:
    r = cluster.redis(cluster.primary)
    limits = {keys.text(k): int(v) for k, v in (await r.hgetall(keys.LIMITS)).items()}
    window_ms = int(cluster.options.window_s * 1000)
    seen = ttl_set = deleted = 0
    async for raw in r.scan_iter(match=p.pattern, count=200):
        if seen >= p.max_keys:
            break
        seen += 1
        key = keys.text(raw)
        pttl, count = await r.pttl(key), await r.zcard(key)
        over = count > limits.get(keys.client_of(key), 0)
        if p.reset and (pttl == -1 or over):
            deleted += await r.delete(key)
        elif pttl == -1:
            ttl_set += int(await r.pexpire(key, window_ms))
    return f"scanned {seen} keys matching {p.pattern}: {ttl_set} TTLs set, {deleted} reset"


async def rollback_build(cluster: Cluster, p: NodeParams) -> str:
    bad = [n for n in cluster.nodes if cluster.node_config(n).build != keys.GOOD_BUILD]
    chosen = _pick(cluster, p.node, bad)
    for node in chosen:
        cfg = dataclasses.replace(cluster.node_config(node), build=keys.GOOD_BUILD)
        await cluster.reload_node(node, cfg)
    return f"rolled back {_names(chosen)} to {keys.GOOD_BUILD}"


async def set_limit(cluster: Cluster, p: SetLimitParams) -> str:
    if p.client not in cluster.options.clients:
        known = ", ".join(cluster.options.clients)
        raise ActionError(f"client: no client {p.client!r}; known: {known}")
    await cluster.redis(cluster.primary).hset(keys.LIMITS, p.client, p.limit)
    return f"limit of {p.client} set to {p.limit} per {cluster.options.window_s:g}s"


REMEDIES = {"restart_node": restart_node, "reconnect_node": reconnect_node,
            "failover_redis": failover_redis, "repair_counters": repair_counters,
            "rollback_build": rollback_build, "set_limit": set_limit}


async def run(cluster: Cluster, name: str, params: msgspec.Struct) -> str:
    return await REMEDIES[name](cluster, params)  # type: ignore[operator]
