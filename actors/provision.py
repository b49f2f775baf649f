"""Provisioning: streams, durable consumers and KV buckets, idempotently.

Consumers are created here, as the admin user, never by actors: each actor
only binds to its own durables (see nats.conf), so no actor can create a
consumer with an arbitrary filter.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, NotFoundError

from bus_schemas import catalog

OBS_STREAM = "MENDERS_OBS"


@dataclass
class ProvisionReport:
    created: list[str]
    updated: list[str]


def stream_config(s: catalog.Stream) -> api.StreamConfig:
    return api.StreamConfig(
        name=s.name,
        description=s.description,
        subjects=list(s.subjects),
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        max_age=s.max_age_s,
        max_bytes=s.max_bytes,
        max_msgs_per_subject=s.max_msgs_per_subject,
        duplicate_window=s.duplicate_window_s,
        discard=api.DiscardPolicy.OLD,
        allow_direct=True,
        num_replicas=1,
    )


def consumer_config(c: catalog.Consumer) -> api.ConsumerConfig:
    # Observations are only worth acting on while fresh: a new durable starts at now.
    deliver = api.DeliverPolicy.NEW if c.stream == OBS_STREAM else api.DeliverPolicy.ALL
    return api.ConsumerConfig(
        durable_name=c.durable,
        description=c.description or None,
        deliver_policy=deliver,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=c.ack_wait_s,
        max_deliver=c.max_deliver,
        max_ack_pending=c.max_ack_pending,
        filter_subjects=list(c.filter_subjects),
    )


async def provision(js: JetStreamContext, replicas: int = 1) -> ProvisionReport:
    report = ProvisionReport([], [])
    for s in catalog.STREAMS:
        cfg = stream_config(s)
        cfg.num_replicas = replicas
        try:
            await js.stream_info(s.name)
        except NotFoundError:
            await js.add_stream(cfg)
            report.created.append(f"stream {s.name}")
        else:
            await js.update_stream(cfg)
            report.updated.append(f"stream {s.name}")
    for c in catalog.CONSUMERS:
        try:
            await js.consumer_info(c.stream, c.durable)
            existed = True
        except NotFoundError:
            existed = False
        await js.add_consumer(c.stream, consumer_config(c))
        (report.updated if existed else report.created).append(f"consumer {c.stream}/{c.durable}")
    buckets = {
        catalog.GOVERNOR_BUCKET: api.KeyValueConfig(
            bucket=catalog.GOVERNOR_BUCKET, history=10, storage=api.StorageType.FILE,
            replicas=replicas, description="Governor state: mode, kill switch, revocations",
        ),
        catalog.EXEC_LEDGER_BUCKET: api.KeyValueConfig(
            bucket=catalog.EXEC_LEDGER_BUCKET, history=5, storage=api.StorageType.FILE,
            replicas=replicas, ttl=30 * 24 * 3600,
            description="Executor claims: each execution's effect at most once",
        ),
        catalog.PLANNER_BUCKET: api.KeyValueConfig(
            bucket=catalog.PLANNER_BUCKET, history=5, storage=api.StorageType.FILE,
            replicas=replicas, ttl=30 * 24 * 3600,
            description="Planner state: plan attempts and alternatives per incident",
        ),
        catalog.DETECTOR_BUCKET: api.KeyValueConfig(
            bucket=catalog.DETECTOR_BUCKET, history=5, storage=api.StorageType.FILE,
            replicas=replicas, description="Detector state: open incidents, invariant timers",
        ),
        catalog.VERIFIER_BUCKET: api.KeyValueConfig(
            bucket=catalog.VERIFIER_BUCKET, history=1, storage=api.StorageType.FILE,
            replicas=replicas, ttl=7 * 24 * 3600,
            description="Verifier: each incident's subject and invariant",
        ),
    }
    for name, kv_cfg in buckets.items():
        try:
            await js.key_value(name)
            report.updated.append(f"kv {name} (kept)")
        except BucketNotFoundError:
            await js.create_key_value(kv_cfg)
            report.created.append(f"kv {name}")
    return report
