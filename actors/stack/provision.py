"""Provisioning: streams, durable consumers and KV buckets, idempotently.

Consumers are created here, as the admin user, never by actors: each actor
only binds to its own durables (see nats.conf), so no actor can create a
consumer with an arbitrary filter.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, NotFoundError

from actors.runtime import killswitch
from actors.runtime.kv import Bucket
from bus_schemas import catalog


@dataclass
class ProvisionReport:
    created: list[str]
    updated: list[str]


def stream_config(s: catalog.Stream) -> api.StreamConfig:
    transform = s.partition_transform
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
        subject_transform=api.SubjectTransform(*transform) if transform else None,
    )


def consumer_config(c: catalog.Consumer) -> api.ConsumerConfig:
    # Observations are only worth acting on while fresh: a new durable starts at now.
    deliver = api.DeliverPolicy.NEW if c.stream == catalog.OBS_STREAM else api.DeliverPolicy.ALL
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


async def provision(js: JetStreamContext, replicas: int | None = None) -> ProvisionReport:
    """Create or update every stream, consumer and bucket. `replicas` None keeps an
    existing stream's own count (and creates at 1): `menders up --nats-url` against a
    cluster that `menders provision --replicas 3` set up must not scale it down to R1."""
    report = ProvisionReport([], [])
    for s in catalog.STREAMS:
        cfg = stream_config(s)
        cfg.num_replicas = replicas or 1
        try:
            info = await js.stream_info(s.name)
        except NotFoundError:
            await js.add_stream(cfg)
            report.created.append(f"stream {s.name}")
        else:
            if replicas is None:
                cfg.num_replicas = info.config.num_replicas or 1
            await js.update_stream(cfg)
            report.updated.append(f"stream {s.name}")
    for stream, durable in catalog.RETIRED_CONSUMERS:
        try:
            await js.delete_consumer(stream, durable)
            report.updated.append(f"consumer {stream}/{durable} (retired, deleted)")
        except NotFoundError:
            pass
    for c in catalog.CONSUMERS:
        try:
            await js.consumer_info(c.stream, c.durable)
            existed = True
        except NotFoundError:
            existed = False
        await js.add_consumer(c.stream, consumer_config(c))
        (report.updated if existed else report.created).append(f"consumer {c.stream}/{c.durable}")
    for b in catalog.KV_BUCKETS:
        try:
            await js.key_value(b.name)
            report.updated.append(f"kv {b.name} (kept)")
        except BucketNotFoundError:
            await js.create_key_value(kv_config(b, replicas or 1))
            report.created.append(f"kv {b.name}")
    if await killswitch.initial_release(Bucket(await js.key_value(catalog.GOVERNOR_BUCKET))):
        report.created.append("kill switch (released)")
    return report


def kv_config(b: catalog.KvBucket, replicas: int = 1) -> api.KeyValueConfig:
    return api.KeyValueConfig(bucket=b.name, history=b.history, storage=api.StorageType.FILE,
                              replicas=replicas, ttl=b.ttl_s or None, description=b.description)
