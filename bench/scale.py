"""Subjects per monitor and detector: how many a pair holds at 1 Hz, and what each costs.

    python bench/scale.py                          # N = 10, 100, 1000, 3000; 30 s each
    python bench/scale.py --sizes 10,100 --seconds 20
    python bench/scale.py --sizes 3000 --processes 2  # two monitors, two detectors

For each N: a synthetic fleet (one process of its own, `scale.py serve`, answering
N `/metrics` pages in the Prometheus text format) is put in menders' charge as N
`service` subjects, each scraped every second, one invariant each. One monitor and
one detector run as their own processes against a real nats-server. After a
warm-up, for `--seconds`:

- `obs_per_s_asked` (N) and `obs_per_s_achieved`: observations that reached the bus;
- `scrape_lag_ms` p50/p99: an observation's arrival on the bus minus its scrape start;
- `detector_lag_ms` p99: sampled every second, how old the oldest observation the
  detector has not yet acknowledged is (0 when it is caught up);
- CPU seconds per subject per minute and RSS (MiB) of the monitor and the detector
  (from /proc), and the fleet server's CPU so its own cost is visible;
- `held`: achieved >= 95 % of asked and the detector's lag p99 under 1 s.

Prints one JSON object and writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_bus, machine, pct, runtime_section, write_result

from actors.stack.natsserver import free_port
from bus_schemas import catalog

TICK = os.sysconf("SC_CLK_TCK")
WARMUP_S = 8.0


# --- the synthetic fleet ------------------------------------------------------------------


def serve(port: int, subjects: int) -> None:
    """N /metrics pages, each its own numbers, rendered once: the fleet must cost little."""
    pages = [(f"# TYPE queue_depth gauge\nqueue_depth {i % 7}\n"
              f"# TYPE requests_total counter\nrequests_total {1000 + i}\n").encode()
             for i in range(subjects)]

    async def page(request: web.Request) -> web.Response:
        i = int(request.match_info["i"])
        if not 0 <= i < subjects:
            raise web.HTTPNotFound()
        return web.Response(body=pages[i], content_type="text/plain")

    app = web.Application()
    app.router.add_get("/s/{i}/metrics", page)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def fleet_config(port: int, subjects: int, *, metrics: bool = False,
                 log_level: str = "WARNING", runtime_extra: str = "") -> str:
    head = (runtime_section(metrics=metrics, log_level=log_level, extra=runtime_extra)
            + '\n[governor]\nmode = "observe"\n\n')
    body = []
    for i in range(subjects):
        body.append(
            f'[subjects.s{i}]\nkind = "service"\nembedded = false\n'
            f'url = "http://127.0.0.1:{port}/s/{i}"\nscrape_interval_s = 1.0\n'
            f'[subjects.s{i}.options]\nmetrics_url = "http://127.0.0.1:{port}/s/{i}/metrics"\n'
            f'metrics = {{ depth = {{ name = "queue_depth" }} }}\n'
            f'invariants = [{{ name = "depth", metric = "depth", op = "<", threshold = 100, '
            f'for_s = 3.0, description = "queue depth under 100" }}]\n')
    return head + "\n".join(body)


# --- measuring ------------------------------------------------------------------------------


class _Stamp(msgspec.Struct):
    ts: float


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _start_fleet(port: int, n: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "serve", "--port", str(port),
                             "--subjects", str(n)], stdin=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def measure(n: int, seconds: float, processes: int = 1) -> dict[str, Any]:
    port = free_port()
    fleet = _start_fleet(port, n)
    tmp = Path(tempfile.mkdtemp(prefix=f"menders-scale-{n}-"))
    try:
        async with bench_bus(tmp, fleet_config(port, n)) as bus:
            # With more than one process per actor they share the subjects by partition.
            procs = {f"{a}{i or ''}": bus.spawn(a, tag=str(i or ""))
                     for a in ("monitor", "detector") for i in range(processes)}
            await bus.wait_heartbeats({"monitor": processes, "detector": processes},
                                      timeout=120)
            # Until the partitions are split (a lease round or two after the last start).
            await asyncio.sleep(2 * catalog.PARTITION_RENEW_S * processes)
            operator = await bus.connect(catalog.OPERATOR)
            decoder = msgspec.json.Decoder(_Stamp)
            arrivals: list[float] = []
            lags: list[float] = []
            counting = False

            async def on_obs(msg: Any) -> None:
                if counting:
                    now = time.time()
                    arrivals.append(now)
                    lags.append(now - decoder.decode(msg.data).ts)

            await operator.subscribe(catalog.under("obs"), cb=on_obs)
            admin = await bus.connect(catalog.ADMIN)
            jsm = admin.jetstream(timeout=10)
            await asyncio.sleep(WARMUP_S)
            cpu0 = {a: _cpu_s(p.pid) for a, p in {**procs, "fleet": fleet}.items()}
            counting, started = True, time.time()
            behind: list[float] = []
            while time.time() - started < seconds:
                behind.append(await _detector_behind(jsm))
                await asyncio.sleep(1.0)
            counting = False
            elapsed = time.time() - started
            cpu = {a: _cpu_s(p.pid) - cpu0[a] for a, p in {**procs, "fleet": fleet}.items()}
            rss = {a: _rss_mib(p.pid) for a, p in procs.items()}
            alive = {a: p.poll() is None for a, p in procs.items()}
    finally:
        _stop(fleet)
    achieved = len(arrivals) / elapsed
    return {
        "subjects": n,
        "processes_per_actor": processes,
        "seconds": round(elapsed, 1),
        "obs_per_s_asked": n,
        "obs_per_s_achieved": round(achieved, 1),
        "achieved_over_asked": round(achieved / n, 3),
        "scrape_lag_ms": {"p50": round(pct(lags, 50) * 1000, 1),
                          "p99": round(pct(lags, 99) * 1000, 1)} if lags else {},
        "detector_lag_ms_p99": round(pct(behind, 99) * 1000, 1) if behind else None,
        "cpu_s_per_subject_per_min": {a: round(c / n / (elapsed / 60), 5)
                                      for a, c in cpu.items()},
        "cpu_cores": {a: round(c / elapsed, 3) for a, c in cpu.items()},
        "rss_mib": {a: round(v, 1) for a, v in rss.items()},
        "alive": alive,
        "held": achieved >= 0.95 * n and bool(behind) and pct(behind, 99) < 1.0,
    }


async def _detector_behind(jsm: Any) -> float:
    """Seconds since the oldest observation the detector has not acknowledged was
    stored, over every partition's consumer."""
    lags = [await _behind(jsm, c) for c in catalog.consumers_of("detector")]
    return max(lags, default=0.0)


async def _behind(jsm: Any, consumer: catalog.Consumer) -> float:
    info = await jsm.consumer_info(consumer.stream, consumer.durable)
    if not info.num_pending and not info.num_ack_pending:
        return 0.0
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    try:
        oldest = await jsm.get_msg(consumer.stream, floor + 1, next=True,
                                   subject=consumer.filter_subjects[0])
    except Exception:  # aged out or just acked: caught up as far as can be seen
        return 0.0
    stored = oldest.time.timestamp() if oldest.time else time.time()
    return max(time.time() - stored, 0.0)


async def run(sizes: list[int], seconds: float, processes: int = 1) -> dict[str, Any]:
    rows = []
    for n in sizes:
        row = await measure(n, seconds, processes)
        print(json.dumps(row), file=sys.stderr, flush=True)  # the curve as it is drawn
        rows.append(row)
    held = [r["subjects"] for r in rows if r["held"]]
    return {"bench": "scale", "interval_s": 1.0, "rows": rows,
            "largest_held": max(held) if held else 0, "machine": machine()}


def main() -> int:
    p = argparse.ArgumentParser(prog="scale", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    sv = sub.add_parser("serve", help="the synthetic fleet (started by the bench itself)")
    sv.add_argument("--port", type=int, required=True)
    sv.add_argument("--subjects", type=int, required=True)
    p.add_argument("--sizes", default="10,100,1000,3000")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--processes", type=int, default=1,
                   help="monitor and detector processes each (1..8), sharing by partition")
    args = p.parse_args()
    if args.command == "serve":
        serve(args.port, args.subjects)
        return 0
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes: want comma-separated integers, got {args.sizes!r}")
    if not sizes or any(not 1 <= n <= 10_000 for n in sizes) or not 5 <= args.seconds <= 600:
        p.error("--sizes must be 1..10000 each, --seconds 5..600")
    if not 1 <= args.processes <= catalog.OBS_PARTITIONS:
        p.error(f"--processes must be 1..{catalog.OBS_PARTITIONS}")
    result = asyncio.run(run(sizes, args.seconds, args.processes))
    write_result("scale" if args.processes == 1 else f"scale_x{args.processes}", result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
