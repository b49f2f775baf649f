"""The control plane's raw floor: the crew's broker round trips, done by bare nats-py.

`bench/control_plane.py` runs this on its own nats-server after the crew, so the
two numbers are of one run and one machine. Four relay processes and a
responder, each its own OS process like the actors, do on the critical path
exactly the sequential broker work the crew does between IncidentOpened and
ExecutionStarted, and nothing else (no decode of a schema, no policy, no
metrics, no logs):

    diagnoser  fetch opened; two requests at once (the monitor's lookback, the
               incident memory) to the responder; publish diagnosis (acked)
    planner    fetch diagnosis; two KV gets at once; two CAS writes one after the
               other (the subject's index, then the incident); publish plan
    governor   fetch plan; four KV gets at once (progress, mode, kill, usage); two
               CAS writes (usage, then progress); publish approved
    executor   fetch approved; five KV gets at once (ledger, kill, revocation,
               mode, the verifier's record); the ledger claim (create); stamp
               `started`, then publish it

Each relay fetches one message at a time from its own durable (explicit ack,
acked after its publish, as the runtime does: state and events before the
ack); every publish carries a Nats-Msg-Id. The driver publishes `opened` with a
time.time() stamp and waits for the executor's `started`; the latency is the
executor's stamp minus the driver's, like the crew's envelope stamps.

    BENCH_FLOOR_PASSWORD=... python bench/control_floor.py stage <name> <url>   (internal)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

HERE = Path(__file__).resolve().parent
STREAM, BUCKET, PREFIX = "BENCH_FLOOR", "bench_floor", "benchfloor"
PAD = "x" * 400  # about the size of the crew's events
STATIC_KEYS = ("mode", "kill", "usage", "index", "revoked", "verifier")


def _subject(hop: str) -> str:
    return f"{PREFIX}.{hop}"


async def _connect(url: str, password: str) -> Client:
    return await nats.connect(url, user="admin", password=password, connect_timeout=5)


async def _get(kv: KeyValue, key: str) -> int:
    """One KV read (a miss is a round trip too): the revision, 0 when absent."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return 0
    return entry.revision or 0


async def _stage(name: str, url: str, password: str) -> None:
    nc = await _connect(url, password)
    js = nc.jetstream(timeout=10)
    if name == "responder":
        async def answer(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(_subject("q.*"), cb=answer)
        await nc.publish(_subject(f"ready.{name}"), b"")
        await asyncio.Event().wait()
    kv = await js.key_value(BUCKET)
    produces = {"diagnoser": "diagnosis", "planner": "plan", "governor": "approved",
                "executor": "started"}[name]
    sub = await js.pull_subscribe_bind(name, STREAM)
    await nc.publish(_subject(f"ready.{name}"), b"")
    while True:
        try:
            [msg] = await sub.fetch(1, timeout=5)
        except nats.errors.TimeoutError:
            continue
        body = json.loads(msg.data)
        iid = body["id"]
        if name == "diagnoser":
            await asyncio.gather(nc.request(_subject("q.lookback"), msg.data, timeout=5),
                                 nc.request(_subject("q.recall"), msg.data, timeout=5))
        elif name == "planner":
            _, index_rev = await asyncio.gather(_get(kv, f"state.{iid}"), _get(kv, "index"))
            await kv.update("index", msg.data, last=index_rev)
            await kv.create(f"state.{iid}", msg.data)
        elif name == "governor":
            revs = await asyncio.gather(_get(kv, f"progress.{iid}"), _get(kv, "mode"),
                                        _get(kv, "kill"), _get(kv, "usage"))
            await kv.update("usage", msg.data, last=revs[3])
            await kv.create(f"progress.{iid}", msg.data)
        else:
            await asyncio.gather(_get(kv, f"ledger.{iid}"), _get(kv, "kill"),
                                 _get(kv, "revoked"), _get(kv, "mode"), _get(kv, "verifier"))
            await kv.create(f"ledger.{iid}", msg.data)
            body["started_ts"] = time.time()
        out = json.dumps(body).encode()
        await js.publish(_subject(produces), out, headers={"Nats-Msg-Id": f"{produces}-{iid}"})
        await msg.ack()


async def setup(js: Any) -> None:
    """Its own stream (file, like MENDERS_EVENTS), bucket and durables."""
    await js.add_stream(api.StreamConfig(name=STREAM, subjects=[_subject("*")],
                                         storage=api.StorageType.FILE))
    for durable, hop in (("diagnoser", "opened"), ("planner", "diagnosis"),
                         ("governor", "plan"), ("executor", "approved")):
        await js.add_consumer(STREAM, api.ConsumerConfig(
            durable_name=durable, filter_subject=_subject(hop),
            ack_policy=api.AckPolicy.EXPLICIT, ack_wait=60, max_deliver=5,
            max_ack_pending=1000))
    kv = await js.create_key_value(api.KeyValueConfig(bucket=BUCKET,
                                                      storage=api.StorageType.FILE))
    for key in STATIC_KEYS:
        await kv.put(key, b"{}")


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, round(q * len(s)) - 1))], 3)


async def floor(url: str, password: str, n: int, warmup: int, logs: Path) -> dict[str, Any]:
    """Run the relay chain `n + warmup` times, one incident at a time."""
    nc = await _connect(url, password)
    js = nc.jetstream(timeout=10)
    await setup(js)
    stages = ("responder", "diagnoser", "planner", "governor", "executor")
    ready: set[str] = set()
    started: dict[str, float] = {}
    arrived = asyncio.Event()

    async def on_ready(msg: Any) -> None:
        ready.add(msg.subject.rsplit(".", 1)[-1])
        arrived.set()

    async def on_started(msg: Any) -> None:
        body = json.loads(msg.data)
        started[body["id"]] = body["started_ts"]
        arrived.set()

    await nc.subscribe(_subject("ready.*"), cb=on_ready)
    await nc.subscribe(_subject("started"), cb=on_started)
    procs = []
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    me = str(HERE / "control_floor.py")
    for stage in stages:
        log = open(logs / f"floor-{stage}.log", "wb")  # noqa: ASYNC230 (set-up, once)
        procs.append(subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, me, "stage", stage, url],
            env={**env, "BENCH_FLOOR_PASSWORD": password},
            stdout=log, stderr=log, stdin=subprocess.DEVNULL))
        log.close()
    try:
        await _until(lambda: ready >= set(stages), arrived, 30.0, "relays ready", procs)
        lat: list[float] = []
        for i in range(n + warmup):
            iid = uuid.uuid4().hex
            sent = time.time()
            await js.publish(_subject("opened"), json.dumps(
                {"id": iid, "ts": sent, "pad": PAD}).encode(),
                headers={"Nats-Msg-Id": f"opened-{iid}"})
            await _until(lambda iid=iid: iid in started, arrived, 15.0, f"incident {i}", procs)
            if i >= warmup:
                lat.append((started[iid] - sent) * 1000)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                await asyncio.to_thread(p.wait, 10)
            except subprocess.TimeoutExpired:
                p.kill()
        await nc.close()
    return {"n": len(lat), "p50_ms": _pct(lat, 0.5), "p90_ms": _pct(lat, 0.9),
            "p99_ms": _pct(lat, 0.99), "max_ms": round(max(lat), 3),
            "mean_ms": round(sum(lat) / len(lat), 3)}


async def _until(done: Any, changed: asyncio.Event, timeout: float, what: str,
                 procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        dead = [p.args[3] for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"floor relay exited: {dead}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"floor: no {what} within {timeout:g}s")
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), min(left, 0.5))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "stage" or "BENCH_FLOOR_PASSWORD" not in os.environ:
        sys.exit("usage: BENCH_FLOOR_PASSWORD=... control_floor.py stage <name> <url>")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_stage(sys.argv[2], sys.argv[3], os.environ["BENCH_FLOOR_PASSWORD"]))
