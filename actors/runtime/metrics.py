"""Each actor's Prometheus metrics, in its own registry, served on its own port.

Every series carries an `actor` label so dashboards can aggregate the crew;
other labels have bounded cardinality (kind, outcome, consumer), never an id.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

M = TypeVar("M", Counter, Gauge, Histogram)


class Bound(Generic[M]):
    """A metric whose `actor` label is already filled in."""

    def __init__(self, metric: M, actor: str) -> None:
        self.metric: M = metric
        self.actor = actor

    def labels(self, **labels: str) -> M:
        child: M = self.metric.labels(actor=self.actor, **labels)
        return child


class ActorMetrics:
    def __init__(self, actor: str, registry: CollectorRegistry | None = None) -> None:
        self.actor = actor
        self.registry = registry or CollectorRegistry()
        self.handled = self.counter(
            "menders_messages_handled",
            "Messages handled, by kind and outcome (ack, nak, dead_letter)",
            ["kind", "outcome"],
        )
        self.latency = self.histogram(
            "menders_handler_duration_seconds",
            "Handler latency, decode to ack",
            ["kind"],
            buckets=LATENCY_BUCKETS,
        )
        self.redeliveries = self.counter(
            "menders_redeliveries", "Messages delivered more than once", ["consumer"]
        )
        self.dead_letters = self.counter(
            "menders_dead_letters", "Messages sent to the dead-letter subject", ["consumer"]
        )
        self.published = self.counter(
            "menders_published", "Events published to JetStream", ["kind"]
        )
        self.in_flight = Gauge(
            "menders_in_flight", "Messages being handled now", ["actor"], registry=self.registry
        ).labels(actor=actor)
        self.nats_errors = Counter(
            "menders_nats_errors", "Errors reported by the NATS connection (permission "
            "violations among them)", ["actor"], registry=self.registry
        ).labels(actor=actor)

    def counter(self, name: str, doc: str, labels: list[str]) -> Bound[Counter]:
        return Bound(Counter(name, doc, ["actor", *labels], registry=self.registry), self.actor)

    def gauge(self, name: str, doc: str, labels: list[str]) -> Bound[Gauge]:
        return Bound(Gauge(name, doc, ["actor", *labels], registry=self.registry), self.actor)

    def histogram(self, name: str, doc: str, labels: list[str], **kw: Any) -> Bound[Histogram]:
        return Bound(
            Histogram(name, doc, ["actor", *labels], registry=self.registry, **kw), self.actor
        )

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
