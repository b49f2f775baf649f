"""The actor runtime: what every actor process shares.

An actor is a class with a `name` and a `handle(event, delivery)` coroutine
that returns the events to publish next. The runtime does everything else:
connect with its own credentials, bind its durable pull consumers (created by
provisioning, never by the actor), fetch in batches, decode to typed Structs,
publish the handler's events (JetStream, `Nats-Msg-Id` set), then ack; nak
with backoff on a handler error; dead-letter what cannot be decoded or keeps
failing; keep long handlers alive with `in_progress`; heartbeats, metrics,
structured logs and a clean stop on SIGTERM.

Two rules of its own:

- A stop drains: on SIGTERM fetching stops, in-flight handlers finish, and only
  then do the actor's background loops (the executor's kill and revocation
  watches) and the heartbeats stop, so a kill still reaches a draining actor.
- Let it crash: an error in the runtime's own per-message work (a dead-letter
  publish, a term, a nak) ends the process with the traceback logged and a
  non-zero exit, for the supervisor to restart it; it never leaves a consumer
  silently without workers while the heartbeat says alive.

Long handlers are kept alive by one sweeper per process (`_keepalives`), not a
timer per message: every message in a handler's hands gets an in_progress once a
third of its consumer's ack wait has passed since the last, the ack wait being
the server's own (read when binding, so `nats consumer edit` is honoured).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
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
from actors.runtime.kv import Bucket
from actors.runtime.logs import bind_incident, get_logger
from actors.runtime.metrics import ActorMetrics, Bound
from actors.runtime.outage import Outage, is_outage
from actors.runtime.partitions import Leases
from actors.runtime.publish import publish_event, stamped
from bus_schemas import catalog, codec
from bus_schemas.errors import MendersError
from bus_schemas.messages import INCIDENT_SCOPED, DeadLetter, Event, Heartbeat, kind_of
from bus_schemas.natsconf import inbox_prefix, servers

log = get_logger("menders.runtime")


class MetricsPortError(MendersError, RuntimeError):
    """The actor's metrics port cannot be served (in use, or not allowed)."""


class ActorCrashed(MendersError, RuntimeError):
    """A runtime task (a consumer, a worker, a background loop) failed: the process ends."""


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
        self.link = Outage("nats connection", log)  # one line when it drops, one when back
        # Set once stopping and every consumer has drained: background loops end then.
        self.drained = asyncio.Event()
        self.started_at = time.time()
        # What handlers hold now, each message's _Held -> perf_counter() at its start.
        # A dict keeps insertion order, so the first entry is the oldest message.
        self._holding: dict[_Held, float] = {}
        self._progress_tasks: set[asyncio.Task[None]] = set()
        self._ack_wait: dict[str, float] = {}  # durable -> the server's ack wait, seconds
        self.handled = 0
        self.metrics_port = 0
        self._consumer_tasks: list[asyncio.Task[None]] = []
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.leases: Leases | None = None  # set when the actor consumes a partitioned stream
        # Read at scrape time instead of a locked inc/dec on every message.
        self.metrics.in_flight.set_function(lambda: len(self._holding))

    @property
    def in_flight(self) -> int:
        return len(self._holding)

    def oldest_in_flight_s(self) -> float:
        """Age of the oldest message a handler holds (0 when none): a stuck consumer's sign."""
        for started in self._holding.values():
            return max(0.0, time.perf_counter() - started)
        return 0.0

    # --- connection -------------------------------------------------------------

    async def connect(self, *, attempts: int = 40) -> None:
        password = credentials.password_for(self.name, self.config.home_dir)
        delay = 0.1
        for attempt in range(1, attempts + 1):
            try:
                await self.nc.connect(
                    servers=servers(self.url),
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
        # Permission violations reach a client only here: always logged. Connection
        # errors while the broker is away repeat at every reconnect attempt (twice a
        # second): the disconnect was said once, the rest is debug.
        self.metrics.nats_errors.inc()
        if self.link.down and (is_outage(exc) or isinstance(exc, OSError)):
            log.debug("nats error while disconnected", extra={"err": str(exc)})
            return
        log.error("nats error", extra={"err": str(exc)})

    async def _on_disconnected(self) -> None:
        self.link.failed(ConnectionError("disconnected from nats"))

    async def _on_reconnected(self) -> None:
        self.link.recovered()

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

    async def _consume(self, actor: Actor, consumer: catalog.Consumer,
                       halt: asyncio.Event | None = None) -> None:
        """Fetch and handle until stopping (or `halt`: a partition handed over)."""
        assert self.js is not None
        sub = await self.js.pull_subscribe_bind(durable=consumer.durable, stream=consumer.stream)
        info = await self.js.consumer_info(consumer.stream, consumer.durable)
        self._ack_wait[consumer.durable] = info.config.ack_wait or consumer.ack_wait_s
        stopping = self.stopping

        def halted() -> bool:
            return stopping.is_set() or (halt is not None and halt.is_set())

        try:
            if consumer.concurrency <= 1:  # inline, in stream order
                while (msgs := await self._fetch(consumer, sub, halted)) is not None:
                    for i, msg in enumerate(msgs):
                        if halted():
                            await _hand_back(msgs[i:])  # fetched but not started
                            break
                        await self._process(actor, consumer, msg)
                return
            await self._pool(actor, consumer, sub, halted)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _pool(self, actor: Actor, consumer: catalog.Consumer, sub: Any,
                    halted: Callable[[], bool]) -> None:
        """`concurrency` workers sharing one fetched batch: a free worker takes the next
        message itself, and the one that finds the batch empty fetches the next (the
        others wait their turn on the lock). No hand-off per message: a queue between a
        fetch loop and the workers cost a fifth of a pooled consumer's throughput
        (bench/runtime_vs_raw.py). One TaskGroup holds the workers: a worker that fails
        ends the group (and the process), never just itself."""
        batch: deque[Msg] = deque()
        fetching = asyncio.Lock()
        done = False

        async def work() -> None:
            nonlocal done
            while not done:
                if not batch:
                    async with fetching:
                        if not batch and not done:
                            got = await self._fetch(consumer, sub, halted)
                            if got is None:
                                done = True
                            else:
                                batch.extend(got)
                    continue
                msg = batch.popleft()
                if halted():
                    batch.appendleft(msg)
                    done = True
                    break
                await self._process(actor, consumer, msg)

        async with asyncio.TaskGroup() as tg:
            for _ in range(consumer.concurrency):
                tg.create_task(work())
        await _hand_back(list(batch))  # fetched but not started: another instance takes it

    async def _fetch(self, consumer: catalog.Consumer, sub: Any,
                     halted: Callable[[], bool]) -> list[Msg] | None:
        """The next batch (idle fetches are retried here), or None once halted."""
        rc = self.config.runtime
        batch = min(rc.fetch_batch, consumer.max_ack_pending)
        while not halted():
            try:
                msgs: list[Msg] = await sub.fetch(batch, timeout=rc.fetch_timeout_s)
                return msgs
            except (TimeoutError, nats.errors.TimeoutError):
                continue  # idle, not an error
            except nats.errors.ConnectionClosedError:
                if halted():
                    return None
                raise
            except Exception as exc:
                log.warning("fetch failed",
                            extra={"consumer": consumer.durable, "err": repr(exc)})
                await asyncio.sleep(0.5)
        return None

    async def _process(self, actor: Actor, consumer: catalog.Consumer, msg: Msg) -> None:
        delivery = Delivery(msg, consumer)
        if delivery.redelivered:
            self.metrics.redeliveries.labels(consumer=consumer.durable).inc()
        event = admit(msg.data, msg.subject, consumer.schemas,
                      self.config.runtime.max_message_bytes)
        if isinstance(event, str):
            await self._dead_letter(msg, delivery, event)
            return
        kind = kind_of(event)
        started = time.perf_counter()
        held = _Held(msg, started, self._ack_wait.get(consumer.durable, consumer.ack_wait_s) / 3)
        holding = self._holding
        holding[held] = started
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
                del holding[held]
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

    async def _keepalives(self) -> None:
        """An in_progress for every held message a third of its ack wait after the last,
        so a long handler keeps its message (the sweep runs at a quarter of the
        shortest interval: the signal goes out well within the ack wait)."""
        waits = [c.ack_wait_s for c in catalog.consumers_of(self.name)] or [30.0]
        while not self.drained.is_set():
            every = min([*self._ack_wait.values(), *waits]) / 12
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.drained.wait(), max(every, 0.05))
            now = time.perf_counter()
            for held in list(self._holding):
                if now >= held.due:
                    held.due = now + held.interval
                    task = asyncio.ensure_future(_in_progress(held.msg))
                    self._progress_tasks.add(task)
                    task.add_done_callback(self._progress_tasks.discard)

    # --- heartbeats -------------------------------------------------------------

    async def _heartbeats(self) -> None:
        # Beats on while a stopping actor drains: it is alive and still holds messages.
        while not self.drained.is_set():
            beat = Heartbeat(
                actor=self.name,
                pid=os.getpid(),
                started_at=self.started_at,
                in_flight=self.in_flight,
                handled=self.handled,
                metrics_port=self.metrics_port,
                oldest_in_flight_s=round(self.oldest_in_flight_s(), 3),
                partitions=tuple(self.leases.owned) if self.leases else (),
            )
            with contextlib.suppress(Exception):
                await self.publish_core(beat)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.drained.wait(), self.config.runtime.heartbeat_s)

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
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)
        try:
            await self._run(actor_cls)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def _run(self, actor_cls: type[Actor]) -> None:
        # Fail fast on what a human must fix: credentials, then the metrics port.
        credentials.password_for(self.name, self.config.home_dir)
        self.serve_metrics()
        await self.connect()
        actor = actor_cls(self)
        await actor.setup()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._heartbeats())
                tg.create_task(self._keepalives())
                mine = catalog.consumers_of(self.name)
                consumers = [tg.create_task(self._consume(actor, c))
                             for c in mine if c.partition is None]
                partitioned = [c for c in mine if c.partition is not None]
                if partitioned:  # drained once every partition is handed over
                    consumers.append(tg.create_task(self._partitions(actor, partitioned)))
                tg.create_task(self._mark_drained(consumers))
                for loop_fn in actor.background():
                    tg.create_task(self._until_drained(loop_fn))
        except Exception as exc:
            # Let it crash, loudly: the traceback in the log, a non-zero exit, and the
            # supervisor restarts the process; what it held is redelivered.
            log.critical("crashed: a runtime task failed", exc_info=exc)
            raise ActorCrashed(f"{self.name} crashed: {_first_error(exc)}") from exc
        finally:
            await actor.teardown()
            with contextlib.suppress(Exception):
                await self.nc.drain()
            log.info("stopped")

    async def _partitions(self, actor: Actor, consumers: list[catalog.Consumer]) -> None:
        """Consume the partitions this process holds a lease on (actors.runtime.partitions)."""
        assert self.js is not None
        by_partition = {c.partition: c for c in consumers if c.partition is not None}
        running: dict[int, tuple[asyncio.Task[None], asyncio.Event]] = {}
        bucket = Bucket(await self.js.key_value(catalog.PARTITION_BUCKET))
        async with asyncio.TaskGroup() as tg:  # a consumer that fails ends the process

            async def acquire(p: int) -> None:
                await actor.partition_acquired(p)
                halt = asyncio.Event()
                running[p] = (tg.create_task(self._consume(actor, by_partition[p], halt)), halt)

            async def release(p: int) -> None:
                task, halt = running.pop(p)
                halt.set()
                await task  # its in-flight messages handled (or handed back)
                await actor.partition_released(p)

            self.leases = Leases(bucket, self.name, list(by_partition), acquire=acquire,
                                 release=release, metrics=self.metrics)
            await self.leases.run(self.stopping)

    async def _mark_drained(self, consumers: list[asyncio.Task[None]]) -> None:
        """Once stopping, wait until every consumer has drained its in-flight handlers."""
        await self.stopping.wait()
        if consumers:
            await asyncio.wait(consumers)
        log.info("drained")
        self.drained.set()

    async def _until_drained(self, loop_fn: Callable[[], Awaitable[None]]) -> None:
        """Run a background loop until the actor has stopped and drained (or it ends).

        Not merely until stopping: an in-flight handler may still need it (the
        executor's kill watch must reach an action that runs on during a stop).
        """
        task = asyncio.ensure_future(loop_fn())
        drained = asyncio.ensure_future(self.drained.wait())
        try:
            done, _ = await asyncio.wait({task, drained}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task in done:
            task.result()  # a background loop that ended by error ends the actor


async def _hand_back(msgs: Sequence[Msg]) -> None:
    for msg in msgs:
        with contextlib.suppress(Exception):
            await msg.nak()


def admit(data: bytes, subject: str, schemas: tuple[type[Event], ...],
          limit: int) -> Event | str:
    """The event a consumer of `schemas` takes from `data` on `subject`, or why it is
    dead-lettered instead: oversized, undecodable (the field at fault named), or a kind
    that does not belong on that subject."""
    if len(data) > limit:
        return f"oversized: {len(data)} bytes > {limit}"
    try:
        event = codec.decode(data, schemas)
        expected = _expected_subjects(event)
    except (codec.DecodeError, ValueError) as exc:
        return str(exc)
    if subject not in expected:
        return f"{_a(kind_of(event))} does not belong on {subject}"
    if not event.incident_id and type(event) in INCIDENT_SCOPED:
        return f"{_a(kind_of(event))} without an incident_id"
    return event


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def _first_error(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


_SUBJECTS: dict[tuple[type[Event], str, str, str], tuple[str, str]] = {}


def _expected_subjects(event: Event) -> tuple[str, str]:
    """Where `event` may be read from: the subject it is published on, and the one its
    stream stores it under (a partitioned stream appends the partition). Memoized: a
    consumer sees few distinct subjects, many times."""
    key = (type(event), event.subject, getattr(event, "actor", ""), getattr(event, "outcome", ""))
    subjects = _SUBJECTS.get(key)
    if subjects is None:
        # Raises on a bad token: never cached.
        subjects = (catalog.bus_subject_of(event), catalog.stored_subject_of(event))
        if len(_SUBJECTS) < 10_000:
            _SUBJECTS[key] = subjects
    return subjects


class _Held:
    """One message in a handler's hands; hashable by identity, a token in `_holding`."""

    __slots__ = ("due", "interval", "msg")

    def __init__(self, msg: Msg, started: float, interval: float) -> None:
        self.msg = msg
        self.interval = interval
        self.due = started + interval


async def _in_progress(msg: Msg) -> None:
    with contextlib.suppress(Exception):  # acked meanwhile, or the broker is away
        await msg.in_progress()
