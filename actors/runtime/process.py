"""The actor runtime: what every actor process shares.

An actor is a class with a `name` and a `handle(event, delivery)` coroutine
that returns the events to publish next. The runtime does everything else:
connect with its own credentials, bind its durable pull consumers (created by
provisioning, never by the actor), fetch in batches, decode to typed Structs,
publish the handler's events (JetStream, `Nats-Msg-Id` set), then ack; nak
with backoff on a handler error; dead-letter what cannot be decoded or keeps
failing; keep long handlers alive with `in_progress`; heartbeats, metrics,
structured logs and a clean stop on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from actors.runtime import credentials
from actors.runtime.actor import Actor, Delivery, Reject, derive_id
from actors.runtime.config import Config
from actors.runtime.logs import bind_incident, get_logger
from actors.runtime.metrics import ActorMetrics, Bound
from actors.runtime.publish import publish_event, stamped
from bus_schemas import catalog, codec
from bus_schemas.errors import MendersError
from bus_schemas.messages import DeadLetter, Event, Heartbeat, kind_of
from bus_schemas.natsconf import inbox_prefix

log = get_logger("menders.runtime")


class MetricsPortError(MendersError, RuntimeError):
    """The actor's metrics port cannot be served (in use, or not allowed)."""


class Runtime:
    def __init__(self, actor_name: str, config: Config, *, url: str | None = None) -> None:
        if actor_name not in catalog.ACTORS:
            raise ValueError(f"unknown actor {actor_name!r}; known: {', '.join(catalog.ACTORS)}")
        self.name = actor_name
        self.config = config
        self.url = url or credentials.url_from(config.home_dir, config.nats_url)
        self.metrics = ActorMetrics(actor_name)
        self.nc: Client = Client()
        self.js: JetStreamContext | None = None
        self.stopping = asyncio.Event()
        self.started_at = time.time()
        self.in_flight = 0
        self.handled = 0
        self.metrics_port = 0
        self._consumer_tasks: list[asyncio.Task[None]] = []
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Read at scrape time instead of a locked inc/dec on every message.
        self.metrics.in_flight.set_function(lambda: self.in_flight)

    # --- connection -------------------------------------------------------------

    async def connect(self, *, attempts: int = 40) -> None:
        password = credentials.password_for(self.name, self.config.home_dir)
        delay = 0.1
        for attempt in range(1, attempts + 1):
            try:
                await self.nc.connect(
                    servers=[self.url],
                    user=self.name,
                    password=password,
                    name=f"menders-{self.name}",
                    inbox_prefix=inbox_prefix(self.name),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # typed int, sleeps a float
                    connect_timeout=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
                break
            except (nats.errors.NoServersError, OSError, TimeoutError) as exc:
                if attempt == attempts:
                    raise
                log.warning("nats not reachable yet", extra={"url": self.url, "err": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.js = self.nc.jetstream(timeout=self.config.runtime.publish_timeout_s)
        log.info("connected", extra={"url": self.url})

    async def _on_error(self, exc: Exception) -> None:
        # Permission violations reach a client only here.
        self.metrics.nats_errors.inc()
        log.error("nats error", extra={"err": str(exc)})

    async def _on_disconnected(self) -> None:
        log.warning("disconnected from nats")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to nats")

    # --- publishing -------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        """Publish to JetStream and wait for the stream's ack (actors.runtime.publish)."""
        assert self.js is not None
        await publish_event(self.js, event, self.name)
        self.metrics.published.labels(kind=kind_of(event)).inc()

    async def publish_core(self, event: Event) -> None:
        """Fire-and-forget publish, for heartbeats that the next one replaces."""
        event = stamped(event, self.name)
        await self.nc.publish(catalog.bus_subject_of(event), codec.encode(event))

    # --- consuming --------------------------------------------------------------

    async def _consume(self, actor: Actor, consumer: catalog.Consumer) -> None:
        assert self.js is not None
        rc = self.config.runtime
        sub = await self.js.pull_subscribe_bind(durable=consumer.durable, stream=consumer.stream)
        # concurrency > 1: a fixed pool of workers fed through a bounded queue, cheaper
        # per message than a task each; concurrency 1 handles inline, in stream order.
        queue: asyncio.Queue[Msg | None] = asyncio.Queue(maxsize=consumer.concurrency)
        workers = [asyncio.create_task(self._work(actor, consumer, queue))
                   for _ in range(consumer.concurrency if consumer.concurrency > 1 else 0)]
        batch = min(rc.fetch_batch, consumer.max_ack_pending)
        try:
            while not self.stopping.is_set():
                try:
                    msgs = await sub.fetch(batch, timeout=rc.fetch_timeout_s)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue  # idle, not an error
                except nats.errors.ConnectionClosedError:
                    return
                except Exception as exc:
                    log.warning("fetch failed",
                                extra={"consumer": consumer.durable, "err": repr(exc)})
                    await asyncio.sleep(0.5)
                    continue
                for i, msg in enumerate(msgs):
                    if self.stopping.is_set():
                        # Hand back what was fetched but not started.
                        for rest in msgs[i:]:
                            with contextlib.suppress(Exception):
                                await rest.nak()
                        break
                    if workers:
                        await queue.put(msg)
                    else:
                        await self._process(actor, consumer, msg)
        finally:
            for _ in workers:
                await queue.put(None)  # each worker finishes what it holds, then stops
            if workers:
                await asyncio.gather(*workers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _work(self, actor: Actor, consumer: catalog.Consumer,
                    queue: asyncio.Queue[Msg | None]) -> None:
        while (msg := await queue.get()) is not None:
            await self._process(actor, consumer, msg)

    async def _process(self, actor: Actor, consumer: catalog.Consumer, msg: Msg) -> None:
        delivery = Delivery(msg, consumer)
        if delivery.redelivered:
            self.metrics.redeliveries.labels(consumer=consumer.durable).inc()
        limit = self.config.runtime.max_message_bytes
        if len(msg.data) > limit:
            await self._dead_letter(msg, delivery, f"oversized: {len(msg.data)} bytes > {limit}")
            return
        try:
            event = codec.decode(msg.data, consumer.schemas)
            expected = _expected_subject(event)
        except (codec.DecodeError, ValueError) as exc:
            await self._dead_letter(msg, delivery, str(exc))
            return
        if expected != msg.subject:
            await self._dead_letter(
                msg, delivery, f"a {kind_of(event)} does not belong on {msg.subject}"
            )
            return
        kind = kind_of(event)
        self.in_flight += 1
        keepalive = _KeepAlive(msg, consumer.ack_wait_s)
        started = time.perf_counter()
        outcome = "ack"
        with bind_incident(event.incident_id):
            try:
                for out in await actor.handle(event, delivery):
                    await self.publish(out)
                await msg.ack()
            except Reject as exc:
                outcome = "dead_letter"
                await self._dead_letter(msg, delivery, f"rejected: {exc}")
            except asyncio.CancelledError:
                outcome = "nak"
                with contextlib.suppress(Exception):
                    await msg.nak()
                raise
            except Exception as exc:
                outcome = await self._failed(msg, delivery, exc)
            finally:
                keepalive.cancel()
                self.in_flight -= 1
                self.handled += 1
                # Children cached per label set: labels() costs more than the increment.
                self._child(self.metrics.handled, kind, outcome).inc()
                self._child(self.metrics.latency, kind).observe(time.perf_counter() - started)

    async def _failed(self, msg: Msg, delivery: Delivery, exc: Exception) -> str:
        reason = f"{type(exc).__name__}: {exc}"
        if delivery.num_delivered >= delivery.consumer.max_deliver:
            await self._dead_letter(
                msg, delivery, f"failed {delivery.num_delivered} deliveries, last: {reason}"
            )
            return "dead_letter"
        backoff = self.config.runtime.nak_backoff_s
        delay = backoff[min(delivery.num_delivered, len(backoff)) - 1] if backoff else 0.0
        log.warning(
            "handler failed, nak",
            extra={"err": reason, "delivery": delivery.num_delivered, "delay_s": delay},
            exc_info=exc,
        )
        await msg.nak(delay=delay)
        return "nak"

    def _child(self, metric: Bound[Any], *values: str) -> Any:
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            names = metric.metric._labelnames[1:]  # the first is `actor`, bound already
            child = self._children[key] = metric.labels(**dict(zip(names, values, strict=True)))
        return child

    async def _dead_letter(self, msg: Msg, delivery: Delivery, reason: str) -> None:
        """Record why, then terminate: the original stays in its stream at `stream_seq`."""
        letter = DeadLetter(
            id=derive_id(delivery.consumer.durable, delivery.stream_seq),
            actor=self.name,
            consumer=delivery.consumer.durable,
            bus_subject=msg.subject,
            stream_seq=delivery.stream_seq,
            deliveries=delivery.num_delivered,
            reason=reason[:2000],
            payload_bytes=len(msg.data),
            payload_head=msg.data[:512].decode("utf-8", "replace"),
        )
        await self.publish(letter)
        await msg.term()
        self.metrics.dead_letters.labels(consumer=delivery.consumer.durable).inc()
        log.error("dead-lettered", extra={"subject": msg.subject, "reason": reason[:300]})

    # --- heartbeats -------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while not self.stopping.is_set():
            beat = Heartbeat(
                actor=self.name,
                pid=os.getpid(),
                started_at=self.started_at,
                in_flight=self.in_flight,
                handled=self.handled,
                metrics_port=self.metrics_port,
            )
            with contextlib.suppress(Exception):
                await self.publish_core(beat)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.config.runtime.heartbeat_s)

    # --- lifecycle ----------------------------------------------------------------

    def serve_metrics(self) -> None:
        rc = self.config.runtime
        if rc.metrics_base_port <= 0:
            return
        port = rc.metrics_base_port + catalog.ACTORS.index(self.name)
        port = int(os.environ.get("MENDERS_METRICS_PORT", port))
        try:
            self.metrics_port = self.metrics.serve(rc.metrics_host, port)
        except OSError as exc:
            raise MetricsPortError(
                f"cannot serve metrics on {rc.metrics_host}:{port}: {exc.strerror}; set "
                "[runtime] metrics_base_port or MENDERS_METRICS_PORT (0 picks a free port)"
            ) from None
        log.info("metrics", extra={"port": self.metrics_port})

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping")
            self.stopping.set()

    async def run(self, actor_cls: type[Actor]) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        # Fail fast on what a human must fix: credentials, then the metrics port.
        credentials.password_for(self.name, self.config.home_dir)
        self.serve_metrics()
        await self.connect()
        actor = actor_cls(self)
        await actor.setup()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._heartbeats())
                for c in catalog.consumers_of(self.name):
                    tg.create_task(self._consume(actor, c))
                for loop_fn in actor.background():
                    tg.create_task(self._until_stopped(loop_fn))
        finally:
            await actor.teardown()
            with contextlib.suppress(Exception):
                await self.nc.drain()
            log.info("stopped")

    async def _until_stopped(self, loop_fn: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.ensure_future(loop_fn())
        stop = asyncio.ensure_future(self.stopping.wait())
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        else:
            stop.cancel()
            task.result()  # a background loop that ended by error ends the actor


_SUBJECTS: dict[tuple[type[Event], str, str, str], str] = {}


def _expected_subject(event: Event) -> str:
    """catalog.bus_subject_of, memoized: a consumer sees few distinct subjects, many times."""
    key = (type(event), event.subject, getattr(event, "actor", ""), getattr(event, "outcome", ""))
    subject = _SUBJECTS.get(key)
    if subject is None:
        subject = catalog.bus_subject_of(event)  # raises on a bad token: never cached
        if len(_SUBJECTS) < 10_000:
            _SUBJECTS[key] = subject
    return subject


class _KeepAlive:
    """Sends in_progress every ack_wait/3 while a handler runs.

    A timer rather than a task per message: most handlers finish long before the
    first tick, and a task created and cancelled per message costs about as much
    as the rest of the runtime's per-message work.
    """

    def __init__(self, msg: Msg, ack_wait_s: float) -> None:
        self.msg = msg
        self.interval = ack_wait_s / 3
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        self.handle = self.loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        task = self.loop.create_task(self._progress())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.handle = self.loop.call_later(self.interval, self._tick)

    async def _progress(self) -> None:
        with contextlib.suppress(Exception):
            await self.msg.in_progress()

    def cancel(self) -> None:
        self.handle.cancel()
        for task in self.tasks:
            task.cancel()

