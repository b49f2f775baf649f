"""The menders runtime against raw nats-py: consume throughput and cross-process hop latency.

    python bench/runtime_vs_raw.py [--messages 20000] [--pings 2000]

One nats-server (started here, loopback, temp dir, the generated nats.conf),
one publisher (this process) and, in turn, two consumer processes:

raw      nats-py only: pull_subscribe_bind, fetch(64), ack; the admin user, its own stream.
runtime  the real actors.runtime.process.Runtime under the diagnoser's name and credentials, its
         real durable, typed msgspec decode of IncidentOpened, the real handler path.

Throughput: N messages are queued first, then the consumer starts; the rate is
counted from its first handled message to its N-th. Hop latency: sequential pings,
one at a time; the publisher stamps time.monotonic() (CLOCK_MONOTONIC, shared by
processes) into the payload, the consumer takes its own stamp when the message is
in its hands (raw: after fetch; runtime: at the handler's first line) and answers
with a pong so that the next ping starts only then. Prints one JSON object and
writes it to bench/results/runtime_vs_raw.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
from nats.js import api

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RAW_STREAM, RAW_SUBJECT, RAW_DURABLE, PONG = "BENCH_RAW", "bench.raw", "raw", "bench.pong"
BENCH_SUBJECT = "bench"  # the managed-subject token used for the runtime's messages
WARMUP_PINGS = 100


def payload(kind: str, sent: float) -> bytes:
    """The same IncidentOpened JSON for both consumers: same size, same content."""
    from bus_schemas import codec
    from bus_schemas import messages as m

    event = m.IncidentOpened(incident_id="bench-incident", invariant=kind, summary="bench",
                             value=sent, threshold=0.25,
                             subject=BENCH_SUBJECT, producer="detector",
                             symptoms={"p99_ms": 412.0, "error_rate": 0.01},
                             recent_logs=["GET /checkout 200 412ms"] * 3)
    return codec.encode(event)


# --- consumer processes --------------------------------------------------------------


class Results:
    def __init__(self, n: int, k: int, out: str) -> None:
        self.n, self.k, self.out = n, k, out
        self.first = self.last = 0.0
        self.count = 0
        self.hops: list[float] = []

    def got_tp(self) -> None:
        now = time.monotonic()
        if self.count == 0:
            self.first = now
        self.count += 1
        if self.count == self.n:
            self.last = now

    def done(self) -> bool:
        return self.count >= self.n and len(self.hops) >= self.k

    def write(self) -> None:
        Path(self.out).write_text(json.dumps({"first": self.first, "last": self.last,
                                              "count": self.count, "hops": self.hops}))


async def raw_consumer(url: str, password: str, n: int, k: int, out: str) -> None:
    res = Results(n, k, out)
    nc = await nats.connect(url, user="admin", password=password)
    sub = await nc.jetstream().pull_subscribe_bind(durable=RAW_DURABLE, stream=RAW_STREAM)
    while not res.done():
        try:
            msgs = await sub.fetch(64, timeout=0.5)  # the runtime's default batch and timeout
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            received = time.monotonic()
            doc = json.loads(msg.data)
            if doc["invariant"] == "ping":
                res.hops.append(received - doc["value"])
                await nc.publish(PONG, b"")
            else:
                res.got_tp()
            await msg.ack()
    res.write()
    await nc.drain()


def runtime_consumer(n: int, k: int, out: str) -> None:
    from actors.runtime import Actor, Delivery, Runtime, config, follow_id, logs
    from bus_schemas import messages as m

    res = Results(n, k, out)

    class BenchActor(Actor):
        name = "diagnoser"

        async def handle(self, event: m.Event, delivery: Delivery) -> Sequence[m.Event]:
            received = time.monotonic()
            assert isinstance(event, m.IncidentOpened)
            pong: list[m.Event] = []
            if event.invariant == "ping":
                res.hops.append(received - event.value)
                # The pong goes through the runtime's own publish (JetStream, PubAck).
                pong.append(m.Diagnosis(id=follow_id(event, "pong"), subject=BENCH_SUBJECT,
                                        incident_id=event.incident_id,
                                        invariant="ping", hypothesis="pong",
                                        causation_id=event.id))
            else:
                res.got_tp()
            if res.done():
                res.write()
                self.rt.stop()
            return pong

    cfg = config.load()
    logs.setup("diagnoser", cfg.runtime.log_level)
    asyncio.run(Runtime("diagnoser", cfg).run(BenchActor))


# --- the publisher / orchestrator ----------------------------------------------------------


async def preload(js: Any, subject: str, n: int) -> None:
    body = payload("tp", 0.0)
    window = 256
    for start in range(0, n, window):
        await asyncio.gather(*(js.publish(subject, body) for _ in range(min(window, n - start))))


async def run_one(kind: str, nc: Any, url: str, passwords: dict[str, str], home: Path,
                  n: int, k: int) -> dict[str, Any]:
    from bus_schemas import catalog
    from bus_schemas import messages as m
    from bus_schemas.natsconf import password_env

    js = nc.jetstream(timeout=10)
    menders_in = catalog.subject_for(m.IncidentOpened, subject=BENCH_SUBJECT)
    subject = RAW_SUBJECT if kind == "raw" else menders_in
    pong_subject = PONG if kind == "raw" else catalog.subject_for(m.Diagnosis,
                                                                  subject=BENCH_SUBJECT)
    await preload(js, subject, n)
    out = home / f"{kind}.json"
    env = {k_: v for k_, v in os.environ.items() if not k_.startswith("MENDERS_")}
    env.update(MENDERS_NATS_URL=url, MENDERS_HOME=str(home), MENDERS_METRICS_PORT="0",
               PYTHONPATH=str(REPO))
    env[password_env("diagnoser")] = passwords["diagnoser"]
    argv = [sys.executable, __file__, f"{kind}-consumer", "--messages", str(n),
            "--pings", str(k + WARMUP_PINGS), "--out", str(out)]
    if kind == "raw":
        argv += ["--url", url, "--password", passwords["admin"]]
    log = open(home / f"{kind}.log", "wb")  # noqa: ASYNC230 - before the timed part
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=REPO)  # noqa: ASYNC220
    pongs: asyncio.Queue[None] = asyncio.Queue()

    async def on_pong(_msg: Any) -> None:
        pongs.put_nowait(None)

    sub = await nc.subscribe(pong_subject, cb=on_pong)
    try:
        # Wait for the backlog to drain before pinging, so pings never queue behind it.
        info_deadline = time.monotonic() + 60
        durable = RAW_DURABLE if kind == "raw" else "diagnoser"
        stream = RAW_STREAM if kind == "raw" else catalog.EVENTS_STREAM
        while (await js.consumer_info(stream, durable)).ack_floor.stream_seq < n:
            if time.monotonic() > info_deadline or proc.poll() is not None:
                raise RuntimeError(f"{kind} consumer did not drain: see {home / kind}.log")
            await asyncio.sleep(0.05)
        for _ in range(k + WARMUP_PINGS):
            await js.publish(subject, payload("ping", time.monotonic()))
            await asyncio.wait_for(pongs.get(), 10)
        code = await asyncio.to_thread(proc.wait, 30)
        if code != 0:
            raise RuntimeError(f"{kind} consumer exited {code}: see {home / kind}.log")
    finally:
        await sub.unsubscribe()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    data = json.loads(out.read_text())
    hops = sorted(data["hops"][WARMUP_PINGS:])
    return {
        "messages": n,
        "throughput_msgs_per_s": round((n - 1) / (data["last"] - data["first"]), 1),
        "pings": len(hops),
        "hop_p50_ms": round(_pct(hops, 50) * 1000, 4),
        "hop_p99_ms": round(_pct(hops, 99) * 1000, 4),
        "hop_mean_ms": round(statistics.fmean(hops) * 1000, 4),
    }


def _pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def bench(n: int, k: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from actors.runtime import credentials
    from actors.stack import provision
    from actors.stack.natsserver import EmbeddedNats

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="menders-bench-") as tmp:
        passwords = credentials.generate()
        server = EmbeddedNats(Path(tmp) / "nats", passwords)
        await server.start()
        try:
            nc = await nats.connect(server.url, user="admin", password=passwords["admin"])
            js = nc.jetstream(timeout=10)
            await provision.provision(js)
            await js.add_stream(api.StreamConfig(name=RAW_STREAM, subjects=[RAW_SUBJECT],
                                                 storage=api.StorageType.FILE))
            # The same consumer settings the runtime's durable has.
            await js.add_consumer(RAW_STREAM, api.ConsumerConfig(
                durable_name=RAW_DURABLE, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=60,
                max_deliver=5, max_ack_pending=1000))
            home = Path(tmp)
            raw = await run_one("raw", nc, server.url, passwords, home, n, k)
            runtime = await run_one("runtime", nc, server.url, passwords, home, n, k)
            await nc.close()
        finally:
            server.stop()
    return {
        "bench": "runtime_vs_raw",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "raw": raw,
        "runtime": runtime,
        "ratios": {
            "throughput_runtime_over_raw": round(
                runtime["throughput_msgs_per_s"] / raw["throughput_msgs_per_s"], 3),
            "hop_p50_runtime_over_raw": round(runtime["hop_p50_ms"] / raw["hop_p50_ms"], 3),
            "hop_p99_runtime_over_raw": round(runtime["hop_p99_ms"] / raw["hop_p99_ms"], 3),
        },
        "goals": {"throughput_ratio_at_least": 0.8, "hop_ratio_at_most": 1.5},
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("role", nargs="?", default="bench",
                   choices=("bench", "raw-consumer", "runtime-consumer"))
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--pings", type=int, default=2_000)
    p.add_argument("--out", default="")
    p.add_argument("--url", default="")
    p.add_argument("--password", default="")
    args = p.parse_args()
    if args.role == "raw-consumer":
        asyncio.run(raw_consumer(args.url, args.password, args.messages, args.pings, args.out))
        return
    if args.role == "runtime-consumer":
        runtime_consumer(args.messages, args.pings, args.out)
        return
    result = asyncio.run(bench(args.messages, args.pings))
    text = json.dumps(result, indent=2)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "runtime_vs_raw.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
