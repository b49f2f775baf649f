"""The monitor: scrapes every configured subject and publishes observations.

It consumes nothing from the bus. Each subject gets its own background loop
with a fixed-rate ticker: tick k is due at start + k * scrape_interval_s, so
the schedule never drifts with scrape time. Every tick starts its scrape as
a task, so a slow scrape delays neither the next tick nor any other subject;
at most `MAX_IN_FLIGHT` scrapes of one subject run at once and a tick that
finds them all busy is skipped (counted), which bounds the load a hung
subject can cause. A scrape that times out or fails is itself a symptom:
it is published as an observation with up=False and the error. A broker
outage is not: observations that cannot be published are counted
(`publish_failed`), logged once per outage, and the schedule goes on.

The observer (the subject definition's `make_observer`) does the protocol
work; the monitor only schedules, bounds and sanitises its output: metrics
must be finite floats (JSON has no NaN) and log lines are capped, because
they are untrusted data travelling on to the detector and the diagnoser.

It also keeps what it published lately (actors.monitor.history.History) and
answers read-only queries for it on `menders.query.obs.<method>`: the Claude
diagnoser's recent_observations and recent_logs tools.

Several monitors share the subjects by the same partitions as the detectors
(catalog.partition_of, actors.runtime.partitions): each scrapes only the
subjects of the partitions it holds a lease on, and answers queries only about
those, so exactly one monitor replies. A dead monitor's subjects are scraped
again by a survivor once its lease has expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

import subjects
from actors.monitor.alerts import AlertBook, receiver, serve
from actors.monitor.history import History, answer_obs_query
from actors.runtime import Actor, Delivery, Runtime
from actors.runtime.config import SubjectConfig
from actors.runtime.kv import Bucket
from actors.runtime.logs import get_logger
from actors.runtime.outage import Outage, is_outage
from actors.runtime.partitions import Leases, in_partition
from bus_schemas import catalog
from bus_schemas.messages import Event, Observation
from bus_schemas.queries import ObsQuery, ObsReply
from subjects.base import ObserverProtocol

log = get_logger("menders.monitor")

MAX_IN_FLIGHT = 3
MIN_TIMEOUT_S = 2.0
MAX_LOG_LINES = 50
MAX_LOG_LINE_CHARS = 2000


@dataclass(frozen=True)
class Target:
    """What an observer is built from (the kind's `make_observer(target)`): where the
    subject answers and logs, where an embedded one keeps its state, and its own
    settings, already validated by its kind (`subjects.validate_options`)."""

    name: str
    url: str
    log_file: Path | None
    scrape_interval_s: float
    kind: str = "webshop"
    options: msgspec.Struct | None = None  # the kind's options Struct; None: it takes none
    # An embedded subject's state directory (<home>/subjects/<name>, where `menders up`
    # starts it); None for a subject someone else runs.
    data_dir: Path | None = None
    embedded: bool = False

    @classmethod
    def of(cls, name: str, cfg: SubjectConfig, home: Path) -> Target:
        return cls(name, cfg.url, cfg.log_file(home, name), cfg.scrape_interval_s,
                   kind=cfg.kind, options=subjects.validate_options(cfg.kind, cfg.options),
                   data_dir=home / "subjects" / name if cfg.embedded else None,
                   embedded=cfg.embedded)

    @property
    def timeout_s(self) -> float:
        # Longer than one interval, so a slow but alive subject is not called down.
        return max(2 * self.scrape_interval_s, MIN_TIMEOUT_S)


def sanitize(subject: str, ts: float, fields: dict[str, Any], scrape_ms: float) -> Observation:
    metrics: dict[str, float] = {}
    raw = fields.get("metrics")
    for key, value in (raw.items() if isinstance(raw, dict) else ()):
        try:
            f = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            metrics[str(key)] = f
    raw_lines = fields.get("log_lines")
    lines = [str(line)[:MAX_LOG_LINE_CHARS]
             for line in (list(raw_lines) if isinstance(raw_lines, list | tuple) else [])
             [-MAX_LOG_LINES:]]
    return Observation(subject=subject, ts=ts, up=bool(fields.get("up")), metrics=metrics,
                       log_lines=lines, error=str(fields.get("error") or "")[:2000],
                       scrape_ms=scrape_ms)


def phase(name: str) -> float:
    """A subject's fixed offset in [0, 1) of its interval, the same in every process."""
    return zlib.crc32(name.encode()) / 2**32


class Monitor(Actor):
    name = "monitor"

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        self.targets: dict[str, Target] = {}
        self.observers: dict[str, ObserverProtocol] = {}
        self.history: dict[str, History] = {}
        # Per subject: a broker outage is logged once, not at every scrape.
        self.outages: dict[str, Outage] = {}
        self.query_sub: Subscription | None = None
        self.scraping: set[str] = set()  # the subjects of the partitions this process holds
        self.scrapes = rt.metrics.counter(
            "menders_monitor_scrapes",
            "Scrapes by subject and outcome (up, down, timeout, error, skipped, "
            "publish_failed)", ["subject", "outcome"])
        self.alerts: AlertBook | None = None
        self.receiver: web.AppRunner | None = None
        self.alerts_seen = rt.metrics.counter(
            "menders_monitor_alerts",
            "Alertmanager alerts received, by outcome (firing, resolved, repeated, unrouted, "
            "invalid, bad_payload, unauthorized, too_large)", ["outcome"])
        self.duration = rt.metrics.histogram(
            "menders_monitor_scrape_seconds", "Scrape duration", ["subject"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))

    async def setup(self) -> None:
        for name, cfg in self.config.subjects.items():
            target = Target.of(name, cfg, self.config.home_dir)
            self.targets[name] = target
            self.history[name] = History()
            self.outages[name] = Outage(f"publishing observations of {name}", log)
            log.info("watching", extra={"subject": name, "url": cfg.url,
                                        "interval_s": cfg.scrape_interval_s})

        self.query_sub = await self.rt.nc.subscribe(
            catalog.service_wildcard("monitor"), cb=self._on_query)
        am = self.config.alertmanager
        if am.listen:
            self.alerts = AlertBook(am, self.targets, self.config.home_dir / "monitor" /
                                    "alerts.json")
            for route in am.routes:
                if route.subject not in self.targets:
                    log.warning("alert route to an unconfigured subject: its alerts are "
                                "dropped", extra={"subject": route.subject})
            self.receiver = await serve(receiver(self.alerts, self._count_alerts),
                                        am.listen)
            log.info("alertmanager receiver listening",
                     extra={"listen": am.listen, "path": am.path})

    def _count_alerts(self, outcome: str, n: int) -> None:
        self.alerts_seen.labels(outcome=outcome).inc(n)

    async def _on_query(self, msg: Msg) -> None:
        if not msg.reply:
            return
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            asked = msgspec.json.decode(msg.data, type=ObsQuery).subject
            if asked in self.targets and asked not in self.scraping:
                return  # another monitor's subject: its owner answers
        method = msg.subject.rsplit(".", 1)[-1]
        if method not in ("observations", "logs"):
            reply = ObsReply(ok=False, error=f"unknown query {method!r}; known: "
                                             "observations, logs")
        else:
            try:
                owned = {n: h for n, h in self.history.items() if n in self.scraping}
                reply = answer_obs_query(owned, msg.data, time.time())
            except Exception as exc:  # a bad query must never take the monitor down
                reply = ObsReply(ok=False, error=f"{type(exc).__name__}: {exc}")
        await msg.respond(msgspec.json.encode(reply))

    def background(self) -> Sequence[Callable[[], Awaitable[None]]]:
        return [self._partitioned]

    async def _partitioned(self) -> None:
        """Scrape the subjects of the partitions this process holds (all, when alone)."""
        assert self.rt.js is not None
        bucket = Bucket(await self.rt.js.key_value(catalog.PARTITION_BUCKET))
        schedules: dict[str, asyncio.Task[None]] = {}
        async with asyncio.TaskGroup() as tg:  # a schedule that fails ends the process

            async def acquire(p: int) -> None:
                for name in in_partition(self.targets, p):
                    if name not in self.observers:  # built for the subjects it scrapes only
                        self.observers[name] = subjects.definition_of(
                            self.config.subjects[name]).make_observer(self.targets[name])
                    self.scraping.add(name)
                    schedules[name] = tg.create_task(self._schedule(name))

            async def release(p: int) -> None:
                names = in_partition(self.targets, p)
                stopped = [schedules.pop(n) for n in names if n in schedules]
                for task in stopped:
                    task.cancel()
                await asyncio.gather(*stopped, return_exceptions=True)
                self.scraping.difference_update(names)

            self.rt.leases = Leases(bucket, self.name, range(catalog.OBS_PARTITIONS),
                                    acquire=acquire, release=release, metrics=self.rt.metrics)
            await self.rt.leases.run(self.rt.stopping)

    async def handle(self, event: Event, delivery: Delivery) -> Sequence[Event]:
        return ()  # consumes nothing

    async def teardown(self) -> None:
        if self.receiver is not None:
            await self.receiver.cleanup()
        if self.query_sub is not None:
            await self.query_sub.unsubscribe()
        for observer in self.observers.values():
            try:
                await observer.close()
            except Exception as exc:
                log.warning("observer close failed", extra={"err": repr(exc)})

    async def _schedule(self, name: str) -> None:
        target = self.targets[name]
        interval = target.scrape_interval_s
        loop = asyncio.get_running_loop()
        # Each subject's ticks keep a phase of their own, as Prometheus spreads its
        # scrapes: a thousand subjects started in one instant would scrape and publish
        # in one burst every interval (bench/scale.py: lag p50 0.44 s at 1,500 subjects).
        start = loop.time() + phase(name) * interval
        running: set[asyncio.Task[None]] = set()
        tick = 0
        try:
            while True:
                delay = start + tick * interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif -delay >= interval:
                    # The loop itself was starved: skip the missed ticks, no burst.
                    missed = int(-delay // interval)
                    self.scrapes.labels(subject=name, outcome="skipped").inc(missed)
                    tick += missed
                tick += 1
                if len(running) >= MAX_IN_FLIGHT:
                    self.scrapes.labels(subject=name, outcome="skipped").inc()
                    continue
                task = asyncio.create_task(self._scrape(target))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()

    async def _scrape(self, target: Target) -> None:
        observer = self.observers[target.name]
        ts = time.time()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(target.timeout_s):
                fields = await observer.scrape()
            outcome = "up" if fields.get("up") else "down"
        except TimeoutError:
            fields = {"up": False, "error": f"scrape timed out after {target.timeout_s:g}s"}
            outcome = "timeout"
        except Exception as exc:  # an observer bug must not stop the schedule
            fields = {"up": False, "error": f"scrape failed: {exc!r}"}
            outcome = "error"
        elapsed = time.perf_counter() - started
        self.duration.labels(subject=target.name).observe(elapsed)
        if self.alerts is not None:  # Alertmanager's word on the subject, beside ours
            fields = {**fields, "metrics": {**(fields.get("metrics") or {}),
                                            **self.alerts.metrics(target.name, time.time())},
                      "log_lines": [*(fields.get("log_lines") or []),
                                    *self.alerts.take_notes(target.name)]}
        obs = sanitize(target.name, ts, fields, elapsed * 1000)
        self.history[target.name].add(obs)
        try:
            await self.rt.publish(obs)
        except Exception as exc:
            outcome = "publish_failed"
            if is_outage(exc):  # the broker is down: say so once until it is back
                self.outages[target.name].failed(exc)
            else:
                log.warning("observation not published", extra={"subject": target.name,
                                                                "err": repr(exc)})
        else:
            self.outages[target.name].recovered()
        self.scrapes.labels(subject=target.name, outcome=outcome).inc()


ACTOR = Monitor
